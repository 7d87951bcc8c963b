"""Text views: the same events as the dashboard, printed as lines (terminal IPython, scripts, CI)."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from ..core.events import EvalEnd, Listener, Message, StepEnd, TrainBegin, TrainEnd, counted
from ..config import objective_name
from ..core.memory import human_bytes


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(e: StepEnd) -> str:
    parts = [f"step {e.step}/{e.total_steps}", f"epoch {e.epoch:.2f}"]
    if e.loss is not None:
        parts.append(f"loss {e.loss:.4f}")
    if e.learning_rate is not None:
        parts.append(f"lr {e.learning_rate:.2e}")
    if e.grad_norm is not None:
        parts.append(f"grad {e.grad_norm:.3f}")
    if e.pairs_right is not None:
        parts.append(f"pairs right {e.pairs_right:.0%}")
    if e.tokens_per_s:
        parts.append(f"{e.tokens_per_s:,.0f} loss-tok/s")
    parts.append(f"{fmt_duration(e.elapsed_s)} elapsed, {fmt_duration(e.eta_s)} left")
    if e.memory is not None:
        m = e.memory
        parts.append(f"{'VRAM' if m.kind == 'cuda' else 'RSS'} {human_bytes(m.used_bytes)}")
    return " | ".join(parts)


class TextReporter(Listener):
    """Progress lines at a sensible rate (about 20 per run, and at least every ``every_s`` seconds)."""

    NOTEBOOK_STOP_HINT = "Interrupt the kernel (■ / Ctrl-C) to stop at the next step; the adapter is still saved."
    TERMINAL_STOP_HINT = "Press Ctrl-C to stop at the next step; the adapter is still saved."

    def __init__(self, stream: Optional[TextIO] = None, every_s: float = 10.0, lines_per_run: int = 20,
                 stop_hint: str = NOTEBOOK_STOP_HINT):
        self.stream = stream
        self.stop_hint = stop_hint
        self.every_s = every_s
        self.lines_per_run = lines_per_run
        self._last_t = 0.0
        self._every = 1
        self._first_loss = None
        self._begin: Optional[TrainBegin] = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_message(self, e: Message) -> None:
        self._print(("Warning: " if e.level == "warning" else "") + e.text)

    def on_train_begin(self, e: TrainBegin) -> None:
        self._begin = e
        self._every = max(1, e.total_steps // self.lines_per_run)
        self._print(
            f"Training {e.run_name!r}: {e.examples_text}, {counted(e.total_steps, 'step')} on {e.device}; "
            f"trainable parameters {e.trainable_params:,} of {e.total_params:,} ({e.trainable_percent:.2f}% of the model)"
        )
        if not e.background and self.stop_hint:
            self._print(self.stop_hint)

    def on_step(self, e: StepEnd) -> None:
        if self._first_loss is None and e.loss is not None:
            self._first_loss = e.loss
        now = time.monotonic()
        if e.step in (1, e.total_steps) or e.step % self._every == 0 or now - self._last_t >= self.every_s:
            self._last_t = now
            self._print(step_line(e))

    def on_eval(self, e: EvalEnd) -> None:
        self._print(f"eval at step {e.step}: loss {e.eval_loss:.4f}")

    def on_train_end(self, e: TrainEnd) -> None:
        self._print(summary_text(e, self._first_loss))


def summary_text(e: TrainEnd, first_loss: Optional[float] = None) -> str:
    loss = "n/a"
    first_loss = e.extra.get("first_loss", first_loss)  # a resumed run's curve starts before this process saw it
    if e.final_loss is not None:
        loss = f"{first_loss:.4f} -> {e.final_loss:.4f}" if first_loss is not None else f"{e.final_loss:.4f}"
    resumed = e.extra.get("resumed_at")
    span = (f"(resumed at step {resumed}; this part in {fmt_duration(e.elapsed_s)})" if resumed
            else f"in {fmt_duration(e.elapsed_s)}")
    lines = [f"Run {e.run_name!r} {e.status} after {counted(e.steps, 'step')} {span}; loss {loss}"]
    if e.extra.get("eval_loss") is not None:
        objective = e.extra.get("objective") or "sft"  # a preference run's eval loss is its objective's, over pairs
        what = "eval loss" if objective == "sft" else f"eval loss ({objective_name(objective)}, over the held-out pairs)"
        at = e.extra.get("eval_step")  # a stopped run (or keep_best) reports an evaluation of an earlier step
        lines.append(f"{what} {e.extra['eval_loss']:.4f}" + (f" (at step {at})" if at is not None and at != e.steps else ""))
    if e.peak_memory is not None:
        lines.append(f"peak memory {human_bytes(e.peak_memory.peak_bytes)} ({e.peak_memory.label})")
    if e.adapter_path:
        lines.append(f"adapter saved to {e.adapter_path}")
    elif e.status != "failed":
        lines.append("no adapter saved (no step completed)")
    if e.error:
        lines.append(f"error: {e.error}")
    return "\n".join(lines)
