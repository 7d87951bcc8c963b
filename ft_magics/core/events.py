"""Events the trainer emits and the listener protocol every view implements.

The text reporter and the widget dashboard are both :class:`Listener` s; core code only ever calls
:func:`emit`. Events are plain dataclasses so that they can also be written as JSON lines (a run
in another process streams them back this way).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)


def counted(n: int, noun: str) -> str:
    """"1 step", "2 steps", "2 processes": a count with its noun (regular plurals)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}{'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


@dataclass
class MemoryReading:
    """One memory probe. ``kind`` says what was measured, so views can label it honestly."""

    kind: str  # "cuda" or "cpu"
    used_bytes: int  # CUDA: allocated; CPU: process RSS
    peak_bytes: int  # CUDA: max allocated since reset; CPU: max RSS seen in this run
    total_bytes: int  # CUDA: device total; CPU: system total RAM
    available_bytes: int  # CUDA: total - reserved; CPU: system available
    reserved_bytes: int = 0  # CUDA only: reserved by the caching allocator
    device_used_bytes: int = 0  # CUDA only, from NVML where present: used on the whole device (nvidia-smi's figure)
    label: str = ""  # e.g. "CUDA 0 (NVIDIA A100)" or "CPU process RSS"


@dataclass
class TrainBegin:
    run_name: str
    total_steps: int
    num_examples: int
    trainable_params: int
    total_params: int
    device: str
    settings: dict = field(default_factory=dict)
    background: bool = False
    packed_examples: Optional[int] = None  # with packing: the examples behind the num_examples rows

    @property
    def examples_text(self) -> str:
        """"48 examples", with packing "48 examples packed into 6 rows", for a preference run "48 pairs (DPO)"."""
        if self.packed_examples is not None:
            return f"{counted(self.packed_examples, 'example')} packed into {counted(self.num_examples, 'row')}"
        objective = self.settings.get("objective", "sft")
        if objective != "sft":
            from ..config import objective_name

            return f"{counted(self.num_examples, 'pair')} ({objective_name(objective)})"
        return counted(self.num_examples, "example")

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


@dataclass
class StepEnd:
    step: int
    total_steps: int
    epoch: float
    loss: Optional[float]
    learning_rate: Optional[float]
    grad_norm: Optional[float]
    elapsed_s: float
    eta_s: Optional[float]
    tokens_per_s: Optional[float]  # loss-bearing tokens per second over the run so far
    memory: Optional[MemoryReading] = None
    pairs_right: Optional[float] = None  # preference runs: share of the logged steps' pairs ranked as preferred


@dataclass
class EvalEnd:
    step: int
    eval_loss: float
    metrics: dict = field(default_factory=dict)


@dataclass
class Message:
    """A line of information for the user (data summary, warnings, where things were saved)."""

    text: str
    level: str = "info"  # "info" | "warning"


@dataclass
class TrainEnd:
    run_name: str
    status: str  # "completed" | "stopped" | "interrupted" | "failed"
    steps: int
    final_loss: Optional[float]
    elapsed_s: float
    adapter_path: Optional[str]
    peak_memory: Optional[MemoryReading] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


EVENT_TYPES = {cls.__name__: cls for cls in (TrainBegin, StepEnd, EvalEnd, Message, TrainEnd)}
_HANDLERS = {
    TrainBegin: "on_train_begin",
    StepEnd: "on_step",
    EvalEnd: "on_eval",
    Message: "on_message",
    TrainEnd: "on_train_end",
}


class Listener:
    """Base class for views. Override the hooks you need; all default to doing nothing."""

    def on_train_begin(self, event: TrainBegin) -> None: ...

    def on_step(self, event: StepEnd) -> None: ...

    def on_eval(self, event: EvalEnd) -> None: ...

    def on_message(self, event: Message) -> None: ...

    def on_train_end(self, event: TrainEnd) -> None: ...


class Recorder(Listener):
    """Keeps every event; used by the run record, tests and the Python API."""

    def __init__(self) -> None:
        self.events: list = []

    def _keep(self, event) -> None:
        self.events.append(event)

    on_train_begin = on_step = on_eval = on_message = on_train_end = _keep

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]


def emit(listeners: Iterable[Listener], event) -> None:
    """Deliver ``event`` to every listener. A broken view must never kill a training run."""
    name = _HANDLERS[type(event)]
    for listener in listeners:
        try:
            handler = getattr(listener, name, None)
            if handler is None and callable(listener) and not isinstance(listener, Listener):
                handler = listener  # a plain function (print, a list's append) gets every event
            handler(event)
        except Exception:  # noqa: BLE001 - a view's bug is logged, the run goes on
            log.exception("listener %r failed on %s", listener, type(event).__name__)


def to_json(event) -> dict:
    """A JSON-ready dict with the event type under ``"type"``."""
    return {"type": type(event).__name__, **dataclasses.asdict(event)}


def from_json(data: dict) -> Any:
    data = dict(data)
    cls = EVENT_TYPES[data.pop("type")]
    for f in dataclasses.fields(cls):
        if f.name in ("memory", "peak_memory") and isinstance(data.get(f.name), dict):
            data[f.name] = MemoryReading(**data[f.name])
    return cls(**data)
