"""``%ft_memory``: a live memory gauge (VRAM on CUDA, RAM on the CPU) fed by a background thread.

The thread samples :func:`ft_magics.core.memory.read_memory` every ``interval`` seconds and keeps the
last ``window_s`` seconds for a sparkline of at most 60 bars, each the highest reading of its share of
that window (so the bars and the caption's "last N min" and range describe the same readings).
``%ft_memory off``, the gauge's close button or closing the widget ends the thread. Outside a widget
frontend the same reading is printed as text.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, Optional

from ..core.events import MemoryReading
from ..core.memory import describe, human_bytes, process_peak_bytes, read_memory

SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60  # bars in the gauge's sparkline, whatever the window and interval


def buckets(values, width: int = 60) -> list:
    """``values`` squeezed into at most ``width`` consecutive groups, each shown by its highest value (a spike
    stays visible); fewer values are kept as they are."""
    vals = list(values)
    n = len(vals)
    if n <= width:
        return vals
    return [max(vals[i * n // width:(i + 1) * n // width]) for i in range(width)]


def sparkline(values, width: int = 60) -> str:
    """Unicode bars for all ``values``, at most ``width`` of them (:func:`buckets`), scaled between the
    values' min and max."""
    vals = buckets(values, width)
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi <= lo:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * (len(SPARK) - 1) + 0.5))] for v in vals)


class MemoryGauge:
    """A progress bar, a label and a sparkline, refreshed by a daemon thread until stopped."""

    def __init__(self, interval: float = 1.0, window_s: float = 300.0,
                 probe: Callable[[], MemoryReading] = lambda: read_memory(None, process_peak_bytes())) -> None:
        import ipywidgets as widgets

        self.interval = max(0.05, float(interval))
        self.probe = probe
        self.history: collections.deque = collections.deque(maxlen=max(2, int(window_s / self.interval)))
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="memory",
                                         layout=widgets.Layout(width="360px"))
        from .adapters_panel import TextLine

        self.label = TextLine("reading...", css_class="ft-memory-gauge-label")  # wraps where a Label cut it
        self.spark = widgets.HTML("")
        self.close_button = widgets.Button(description="×", tooltip="Stop the gauge",
                                           layout=widgets.Layout(width="32px"))
        self.close_button.on_click(lambda _b: self.close())
        self.box = widgets.VBox([widgets.HBox([self.bar, self.label, self.close_button]), self.spark])
        self.box.add_class("ft-memory-gauge")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def sample(self) -> MemoryReading:
        """Take one reading and show it (the thread calls this every ``interval``)."""
        m = self.probe()
        self.history.append(m.used_bytes)
        self.samples += 1
        minutes = len(self.history) * self.interval / 60
        per_bar = len(self.history) / SPARK_WIDTH * self.interval
        each = f", each bar the highest of {per_bar:.2g} s" if per_bar >= 1.5 * self.interval else ""
        with self.box.hold_sync():
            self.bar.description = "VRAM" if m.kind == "cuda" else "RAM"
            self.bar.value = min(1.0, m.used_bytes / m.total_bytes) if m.total_bytes else 0.0
            self.label.text = describe(m)
            self.spark.value = (f"<span style='font-family:monospace'>{sparkline(self.history, SPARK_WIDTH)}</span> "
                                f"<small>last {minutes:.1f} min{each}, {human_bytes(min(self.history))}–"
                                f"{human_bytes(max(self.history))}</small>")
        return m

    def start(self) -> "MemoryGauge":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ft_magics-memory-gauge", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.box.comm is None:  # the widget was closed
                break
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a failed probe ends the gauge, never the kernel
                break
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop the thread and close the widget."""
        self.stop()
        self.label.text = "memory gauge stopped"
        self.box.close()


_current: dict = {}


def start_gauge(interval: float = 1.0, show: bool = True) -> MemoryGauge:
    """Stop the previous gauge, start a new one and display it."""
    stop_gauge()
    gauge = MemoryGauge(interval=interval)
    gauge.sample()
    if show:
        from IPython.display import display

        display(gauge.box)
    _current["gauge"] = gauge.start()
    return gauge


def stop_gauge() -> bool:
    gauge = _current.pop("gauge", None)
    if gauge is None:
        return False
    was_running = gauge.running
    gauge.close()
    return was_running


def current_gauge() -> Optional[MemoryGauge]:
    return _current.get("gauge")


__all__ = ["MemoryGauge", "buckets", "sparkline", "start_gauge", "stop_gauge", "current_gauge"]


def memory_magic(word: Optional[str] = None, interval: float = 1.0, once: bool = False,
                 use_widgets: bool = True) -> Optional[MemoryGauge]:
    """What ``%ft_memory [off] [--interval S] [--once]`` does; returns the gauge it started, if any."""
    from ..errors import FtUsageError, did_you_mean
    from . import widget_frontend

    if word is not None and word != "off":
        raise FtUsageError(f"unexpected {word!r}{did_you_mean(word, ['off'])}; usage: %ft_memory [off] [--interval S] [--once]")
    if word == "off":
        print("memory gauge stopped." if stop_gauge() else "no memory gauge running.")
        return None
    if not interval > 0:
        raise FtUsageError(f"--interval must be a positive number of seconds (got {interval}); try --interval 1.")
    if once or not (use_widgets and widget_frontend()):
        print(describe(read_memory(None, process_peak_bytes())))  # "peak": the process's highest, not now
        if not once:
            print("(a live gauge needs a widget frontend such as Jupyter; this is one reading)")
        return None
    return start_gauge(interval)
