"""The loss curve as an SVG line chart, written as text: raw loss, its EMA and eval points.

The dashboard shows it live; every run that saves an adapter writes it into the adapter folder as
``loss_curve.svg`` (:func:`curve_svg` of the run's record), with widgets or without. No plotting library:
matplotlib, which drew this curve before, took about 25 MB of the training process's RSS and tens of
milliseconds per redraw.
"""
from __future__ import annotations

import math
from typing import Optional

CURVE_FILE = "loss_curve.svg"
EMA_BETA = 0.9


class LossCurve:
    """Raw loss, its EMA and eval points as an SVG line chart: :meth:`svg` returns the document.

    Drawn as text, without a plotting library: matplotlib, which drew this curve before, took about 25 MB of
    the training process's RSS (issue 7's memory goal) and tens of milliseconds per redraw; this takes well
    under one. A long run's raw curve is thinned to the extremes per pixel column, so the document stays a
    few KB whatever the number of steps."""

    def __init__(self, width: int = 512, height: int = 224) -> None:
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = 52, 16, 10, 34  # margins around the plot area
        self.steps: list = []
        self.losses: list = []
        self.ema: list = []
        self.eval_steps: list = []
        self.eval_losses: list = []
        self.log_scale = False

    def add(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        prev = self.ema[-1] if self.ema else loss
        self.ema.append(EMA_BETA * prev + (1 - EMA_BETA) * loss if self.ema else loss)

    def add_eval(self, step: int, loss: float) -> None:
        self.eval_steps.append(step)
        self.eval_losses.append(loss)

    @property
    def log_drawn(self) -> bool:
        """Whether the y axis is drawn logarithmic: asked for, and every loss is positive."""
        return self._log_possible(self.log_scale)

    def _log_possible(self, want: bool) -> bool:
        return want and all(v > 0 for v in self.losses + self.eval_losses)

    def svg(self, log: Optional[bool] = None) -> str:
        """The chart as an SVG document; ``log``: a logarithmic loss axis (None: ``log_scale``), where every loss
        is positive."""
        w, h = self.width, self.height
        x0, x1, y0, y1 = self.left, w - self.right, self.top, h - self.bottom  # plot area; y0 is the top
        values = [v for v in self.losses + self.eval_losses if math.isfinite(v)]
        steps = self.steps + self.eval_steps
        log = self._log_possible(self.log_scale if log is None else log) and bool(values)
        fy = math.log10 if log else float
        lo, hi = (fy(min(values)), fy(max(values))) if values else (0.0, 1.0)
        pad = (hi - lo) * 0.06 or max(abs(hi) * 0.06, 0.05)
        lo, hi = lo - pad, hi + pad
        s_lo, s_hi = (min(steps), max(steps)) if steps else (0, 1)
        if s_hi == s_lo:
            s_lo, s_hi = s_lo - 1, s_hi + 1

        def px(step):
            return x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0)

        def py(value):
            return y1 - (fy(value) - lo) / (hi - lo) * (y1 - y0)

        out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="ft-loss-chart" width="{w}" height="{h}" '
               f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="10">',
               f"<title>{self._title()}</title>", f'<rect width="{w}" height="{h}" fill="white"/>']
        grid, labels = [], []
        y_ticks = (_log_ticks(10 ** lo, 10 ** hi) if log else _nice_ticks(lo, hi))
        for v, text in y_ticks:
            y = py(v)
            if y0 - 0.5 <= y <= y1 + 0.5:
                grid.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>')
                labels.append(f'<text x="{x0 - 4}" y="{y + 3.5:.1f}" text-anchor="end">{text}</text>')
        for v, text in _nice_ticks(s_lo, s_hi, integer=True):
            x = px(v)
            if x0 - 0.5 <= x <= x1 + 0.5:
                grid.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}"/>')
                labels.append(f'<text x="{x:.1f}" y="{y1 + 13}" text-anchor="middle">{text}</text>')
        out.append('<g stroke="#e6e6e6" stroke-width="1">' + "".join(grid) + "</g>")
        out.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#999"/>')
        out.append('<g fill="#333">' + "".join(labels) + "</g>")
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{h - 5}" text-anchor="middle" fill="#333">step</text>')
        out.append(f'<text x="12" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" fill="#333" '
                   f'transform="rotate(-90 12 {(y0 + y1) / 2:.1f})">loss{" (log)" if log else ""}</text>')
        if not steps:
            out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" fill="#888">'
                       "waiting for the first step</text>")
        points = lambda xs, ys: " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in zip(xs, ys)  # noqa: E731
                                         if math.isfinite(v) and (v > 0 or not log))
        raw_s, raw_v = _thinned(self.steps, self.losses, int(x1 - x0))
        if raw_s:
            out.append(f'<polyline class="ft-loss-raw" fill="none" stroke="{BLUE}" stroke-opacity="0.45" '
                       f'stroke-width="1" points="{points(raw_s, raw_v)}"/>')
            ema_s, ema_v = _thinned(self.steps, self.ema, int(x1 - x0))
            out.append(f'<polyline class="ft-loss-ema" fill="none" stroke="{BLUE}" stroke-width="2" '
                       f'stroke-linejoin="round" points="{points(ema_s, ema_v)}"/>')
        out.extend(f'<circle class="ft-loss-eval" cx="{px(s):.1f}" cy="{py(v):.1f}" r="3.5" fill="{ORANGE}"/>'
                   for s, v in zip(self.eval_steps, self.eval_losses) if math.isfinite(v))
        out.append(self._legend(x1))
        out.append("</svg>")
        return "".join(out)

    def _title(self) -> str:
        if not self.steps:
            return "loss curve: no step yet"
        text = f"loss curve: {len(self.steps)} steps, last loss {self.losses[-1]:.4f}"
        return text + (f", last eval loss {self.eval_losses[-1]:.4f}" if self.eval_losses else "")

    def _legend(self, x1: float) -> str:
        if not self.steps and not self.eval_steps:
            return ""
        entries = [("loss", f'stroke="{BLUE}" stroke-opacity="0.45" stroke-width="1"'),
                   ("loss (EMA)", f'stroke="{BLUE}" stroke-width="2"')]
        width, x = 92, x1 - 96
        parts = [f'<rect x="{x}" y="{self.top + 4}" width="{width}" height="{14 * (len(entries) + bool(self.eval_steps)) + 6}"'
                 ' fill="white" fill-opacity="0.85" stroke="#ccc"/>']
        y = self.top + 16
        for name, style in entries:
            parts.append(f'<line x1="{x + 6}" y1="{y - 3}" x2="{x + 24}" y2="{y - 3}" {style}/>'
                         f'<text x="{x + 30}" y="{y}" fill="#333">{name}</text>')
            y += 14
        if self.eval_steps:
            parts.append(f'<circle cx="{x + 15}" cy="{y - 3}" r="3.5" fill="{ORANGE}"/>'
                         f'<text x="{x + 30}" y="{y}" fill="#333">eval loss</text>')
        return "".join(parts)


BLUE, ORANGE = "#1f77b4", "#ff7f0e"


def _nice_ticks(lo: float, hi: float, most: int = 6, integer: bool = False) -> list:
    """``(value, label)`` at a round step (1, 2, 2.5 or 5 times a power of ten) between ``lo`` and ``hi``,
    at most ``most`` steps apart end to end."""
    raw = (hi - lo) / max(most, 1)
    if not math.isfinite(raw) or raw <= 0:
        return [(lo, _label(lo, 1.0))]
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9)
    return [(k * step, _label(k * step, step)) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list:
    """Ticks for a log axis: 1, 2, 3 and 5 times each power of ten in range (fewer marks over more decades),
    or round linear steps where that gives fewer than three."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    marks = (1, 2, 3, 5) if last - first <= 2 else (1, 2, 5) if last - first <= 4 else (1,)
    ticks = [(m * 10.0 ** k, _label(m * 10.0 ** k, 10.0 ** k)) for k in range(first, last + 1) for m in marks
             if lo <= m * 10.0 ** k <= hi]
    return ticks if len(ticks) >= 3 else [(v, t) for v, t in _nice_ticks(lo, hi, most=5) if v > 0]


def _label(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs (2.5 steps one more than 1, 2 and 5 steps)."""
    mag = math.floor(math.log10(step) + 1e-9)
    mantissa = step / 10 ** mag
    digits = max(0, -mag + (0 if math.isclose(mantissa, round(mantissa)) else 1))
    text = f"{value:.{digits}f}"
    return "0" if text.strip("-0.") == "" else text


def _thinned(xs: list, ys: list, columns: int) -> tuple:
    """The points, or for more than two per pixel column, each column's lowest and highest in order."""
    if len(xs) <= 2 * max(columns, 1):
        return xs, ys
    lo_x, span = xs[0], (xs[-1] - xs[0]) or 1
    out_x, out_y, bucket = [], [], []
    current = None
    for x, y in zip(xs, ys):
        col = int((x - lo_x) / span * (columns - 1))
        if col != current and bucket:
            _keep_extremes(bucket, out_x, out_y)
            bucket = []
        current = col
        bucket.append((x, y))
    _keep_extremes(bucket, out_x, out_y)
    return out_x, out_y


def _keep_extremes(bucket: list, out_x: list, out_y: list) -> None:
    lo = min(range(len(bucket)), key=lambda i: bucket[i][1])
    hi = max(range(len(bucket)), key=lambda i: bucket[i][1])
    for i in sorted({lo, hi}):
        out_x.append(bucket[i][0])
        out_y.append(bucket[i][1])


def curve_svg(record: dict) -> str:
    """The chart of a run record's ``loss_history`` and ``eval_history`` (``[[step, loss], ...]``)."""
    curve = LossCurve()
    for step, loss in record.get("loss_history") or []:
        curve.add(step, loss)
    for step, loss in record.get("eval_history") or []:
        curve.add_eval(step, loss)
    return curve.svg()
