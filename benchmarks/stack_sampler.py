"""A poor man's sampling profiler: where the main thread is during the slow steps of a training loop.

cProfile slows Python-heavy steps several-fold and so changes what it measures; this samples the main
thread's stack from a side thread every few milliseconds (``sys._current_frames``) and costs almost nothing.
``report(step_ends)`` splits the samples by step and counts, for the steps that took over twice the median,
which functions were on the stack (inclusive) - against the same counts in the ordinary steps.
Used by bench_training.py when BENCH_SAMPLE=1.
"""
from __future__ import annotations

import collections
import statistics
import sys
import threading
import time


class StackSampler:
    def __init__(self, interval: float = 0.005, depth: int = 60) -> None:
        self.interval, self.depth = interval, depth
        self.samples: list = []  # (perf_counter, tuple of "file:function" outermost first)
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True, name="stack-sampler")

    def start(self) -> "StackSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._main)
            stack = []
            while frame is not None and len(stack) < self.depth:
                code = frame.f_code
                stack.append(f"{code.co_filename.rsplit('/', 2)[-2:][-1]}:{code.co_name}")
                frame = frame.f_back
            self.samples.append((time.perf_counter(), tuple(reversed(stack))))

    def report(self, step_ends: list, top: int = 25) -> dict:
        """``step_ends``: perf_counter times at which each step ended, in order."""
        if len(step_ends) < 3 or not self.samples:
            return {}
        spans = list(zip(step_ends[:-1], step_ends[1:]))
        median = statistics.median(b - a for a, b in spans)
        slow = [(a, b) for a, b in spans if b - a > 2 * median]

        def counts(intervals):
            c, n = collections.Counter(), 0
            for t, stack in self.samples:
                if any(a <= t < b for a, b in intervals):
                    n += 1
                    c.update(set(stack))
            return c, n

        slow_c, slow_n = counts(slow)
        fast_c, fast_n = counts([s for s in spans if s not in slow])
        rows = [(f, slow_c[f] / slow_n, fast_c[f] / max(fast_n, 1)) for f, _ in slow_c.most_common(400)]
        # what marks the slow steps: on the stack in them far more often than in the ordinary ones
        rows.sort(key=lambda r: r[1] - r[2], reverse=True)
        return {"median_step_s": round(median, 3), "slow_steps": [round(b - a, 3) for a, b in slow],
                "samples_slow": slow_n, "samples_ordinary": fast_n,
                "share_on_stack": [(f, round(s, 3), round(o, 3)) for f, s, o in rows[:top]]}
