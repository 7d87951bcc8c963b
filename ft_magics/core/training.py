"""Trainer wiring: a PEFT LoRA adapter on the loaded base, trained by ``transformers.Trainer``.

Nothing here is a home-made loop: Trainer owns the optimizer, scheduler, clipping, sampling and
accumulation; ``DataCollatorForSeq2Seq`` pads. This module adds what a notebook needs around it:
events for the views, a stop flag (Stop button / kernel interrupt -> stop at the next step
boundary), the CPU 4-bit layout fix, and an atomic adapter save beside a JSON run record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import TrainConfig
from ..errors import FtUsageError, did_you_mean
from .events import EvalEnd, Message, StepEnd, TrainBegin, TrainEnd, counted, emit
from .memory import read_memory, reset_peak

log = logging.getLogger(__name__)

RUN_RECORD = "ft_run.json"

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "query_key_value", "c_attn",
              "qkv_proj", "out_proj", "dense", "Wqkv", "c_proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "dense_h_to_4h",
        "dense_4h_to_h", "gate_up_proj")
_QV = ("q_proj", "v_proj", "query", "value", "query_key_value", "c_attn", "qkv_proj", "Wqkv")


def _linear_layers(model):
    """``(leaf name, layer)`` of every linear layer LoRA can target (4/8-bit ones included), lm_head excluded.
    Where an adapter already wraps a layer, the wrapped layer, under the wrapper's name: PEFT's ``lora.Linear``
    is no ``nn.Linear``, and its wrapper of a 4-bit layer is itself called ``Linear4bit``."""
    import torch

    for full, mod in model.named_modules():
        path = full.split(".")
        if any(p.startswith("lora_") for p in path) or isinstance(getattr(mod, "base_layer", None), torch.nn.Module):
            continue
        while path and path[-1] == "base_layer":
            path.pop()
        leaf = path[-1] if path else ""
        if leaf != "lm_head" and (isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt")):
            yield leaf, mod


def linear_module_names(model) -> list:
    """Leaf names of the linear layers LoRA can target (4/8-bit ones included), lm_head excluded."""
    return sorted({leaf for leaf, _ in _linear_layers(model)})


def resolve_target_modules(model, spec) -> Any:
    """A preset or a list of names -> what LoraConfig.target_modules takes; checked against the model."""
    available = linear_module_names(model)
    if spec == "all-linear":
        return "all-linear"
    if isinstance(spec, str) and spec in ("qv", "attention", "mlp"):
        pool = {"qv": _QV, "attention": _ATTENTION, "mlp": _MLP}[spec]
        chosen = [n for n in available if n in pool]
        if spec == "qv" and {"q_proj", "v_proj"} <= set(available):
            chosen = ["q_proj", "v_proj"]
        if not chosen:
            raise FtUsageError(
                f"target_modules preset {spec!r} matches no layer of this model. Its linear layers are: "
                f"{', '.join(available)}. Give a list of names, e.g. target_modules: [{', '.join(available[:2])}]."
            )
        return chosen
    names = [spec] if isinstance(spec, str) else list(spec)
    bad = [n for n in names if n not in available]
    if bad:
        from ..config import TARGET_PRESETS

        hint = (" (did you mean 'all-linear'?)" if bad[0].lower().replace("_", "-") in ("all", "linear", "all-linear")
                else did_you_mean(bad[0], list(available) + list(TARGET_PRESETS)))
        raise FtUsageError(
            f"target_modules {bad[0]!r} is not a linear layer of this model{hint}. "
            f"Its linear layers are: {', '.join(available)}; presets: {', '.join(TARGET_PRESETS)}."
        )
    return names


def adapter_size(model, cfg: TrainConfig) -> tuple[int, int]:
    """``(parameters the adapter will have, the highest rank one of its layers can hold)`` for ``cfg``'s
    r and target modules on ``model``: r * (in + out) per adapted layer, plus DoRA's magnitude per output.
    A rank above min(in, out) adds parameters and no capacity."""
    targets = resolve_target_modules(model, cfg.target_modules)
    params, top_rank = 0, 0
    for leaf, mod in _linear_layers(model):
        if targets != "all-linear" and leaf not in targets:
            continue
        n_in, n_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        if not n_in or not n_out:
            continue
        params += cfg.r * (n_in + n_out) + (n_out if cfg.use_dora else 0)
        top_rank = max(top_rank, min(n_in, n_out))
    return params, top_rank


def check_dora_supported(bits: int, device: str, adapter: Optional[str] = None) -> None:
    """Refuse DoRA on an 8-bit base on the CPU before PEFT touches the model: PEFT builds DoRA's magnitudes by
    dequantising each 8-bit layer, which on the CPU leaves bitsandbytes' layer without its scale statistics, so
    the run failed inside bitsandbytes and the base model itself stayed broken (every later generate failed) until
    it was loaded again."""
    if bits == 8 and device == "cpu":
        what = f"adapter {adapter!r} is a DoRA adapter, and DoRA" if adapter else "use_dora: true (DoRA)"
        raise FtUsageError(
            f"{what} on an 8-bit base does not work on the CPU (bitsandbytes' 8-bit layers lose their scales when "
            "PEFT builds DoRA's magnitudes). Load the base in 4-bit (%qlora_load MODEL, the default) or 16-bit "
            "(--bits 16) for DoRA" + ("." if adapter else ", or train plain LoRA on this one (use_dora: false)."))


def check_adapter_fits(model, cfg: TrainConfig, device: str, free: Optional[int] = None) -> None:
    """Refuse, before the model is touched, an adapter whose rank no layer can hold or whose weights,
    gradients and optimizer states would not fit the memory free now (on the CPU that would be the
    kernel's death, not an error)."""
    from .memory import human_bytes, read_memory
    from .planner import adapter_bytes, rank_refusal

    params, top_rank = adapter_size(model, cfg)
    if top_rank and cfg.r > top_rank:
        raise rank_refusal(f"r={cfg.r}", f"r: {top_rank}", top_rank)

    need = params * adapter_bytes(cfg.optimizer)  # fp32 weight + gradient, and the optimizer's states
    free = read_memory(device).available_bytes if free is None else free
    if free and need > 0.8 * free:
        raise FtUsageError(
            f"r={cfg.r} on {cfg.target_modules} makes an adapter of {params:,} parameters: its weights, "
            f"gradients and optimizer states need about {human_bytes(need)}, and {human_bytes(free)} is free. "
            "Use a smaller r (8-64 covers most tasks) or fewer target_modules.")


# --------------------------------------------------------------------------- CPU 4-bit layout
def _linear4bit_modules(model):
    for mod in model.modules():
        if type(mod).__name__ == "Linear4bit" and hasattr(mod, "support_avx512bf16_for_cpu"):
            yield mod


def cpu_packed(quant_state) -> bool:
    """Whether a 4-bit weight's quant state is in bitsandbytes' CPU inference layout (see :func:`unpack_cpu_4bit`)."""
    return quant_state is not None and bool(getattr(quant_state, "packing_format_for_cpu", False))


def keep_unpackable_layers_standard(model) -> int:
    """Switch bitsandbytes' CPU inference repacking off for the 4-bit layers it cannot repack; return how many.

    Its packing needs the output width a multiple of 32 and the input width a multiple of the quantisation
    block (64): a model of hidden size 96 trained, but every generate failed inside bitsandbytes ("shape
    '[96, 1]' is invalid for input of size 144"). Those layers keep the standard layout and its kernel."""
    n = 0
    for mod in _linear4bit_modules(model):
        qs = getattr(mod.weight, "quant_state", None)
        shape = getattr(qs, "shape", None)
        if qs is None or shape is None or len(shape) != 2 or cpu_packed(qs):
            continue
        out_f, in_f = int(shape[0]), int(shape[1])
        if out_f % 32 or in_f % int(getattr(qs, "blocksize", 64) or 64):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def remember_unpacked_4bit(model) -> None:
    """Keep a reference to every unpacked 4-bit weight and a copy of its quant state.

    bitsandbytes' CPU inference packing rewrites the quant state in place (nested absmax dequantised,
    dtype changed) and its inverse is not exact, so the base would drift after generate -> train. Holding
    the originals (the packed weight is a new tensor: this costs one extra copy of the 4-bit weights only
    once packing has happened) lets :func:`unpack_cpu_4bit` restore them bit for bit.
    """
    import copy

    for mod in _linear4bit_modules(model):
        qs = getattr(mod.weight, "quant_state", None)
        if qs is not None and not cpu_packed(qs):
            mod._ft_unpacked = (mod.weight.data, copy.copy(qs))


def unpack_cpu_4bit(model) -> int:
    """Undo bitsandbytes' CPU inference repacking; return how many layers were unpacked.

    On the CPU, the first no-grad eval forward of a ``Linear4bit`` (any ``generate``) repacks its weight
    into an AVX512 layout whose kernel has no autograd. Training through it silently stops gradients
    from flowing back through the frozen base layers, so we restore the standard layout first: the
    exact original where :func:`remember_unpacked_4bit` kept it, else bitsandbytes' inverse conversion.
    """
    import copy

    n = 0
    for mod in _linear4bit_modules(model):  # (none without bitsandbytes: a 16-bit base trains without it)
        qs = getattr(mod.weight, "quant_state", None)
        if cpu_packed(qs):
            kept = getattr(mod, "_ft_unpacked", None)
            if kept is not None:
                mod.weight.data, mod.weight.quant_state = kept[0], copy.copy(kept[1])
            else:
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                mod.weight.data, mod.weight.quant_state = _convert_weight_packed_for_cpu_inverse(mod.weight.data, qs)
            mod.quant_state = mod.weight.quant_state
            n += 1
    return n


def save_packed_4bit_exactly() -> bool:
    """Make every ``state_dict()`` of a repacked 4-bit layer write the kept original and leave the layer packed;
    return whether the reader was installed now (False: it already was).

    bitsandbytes' ``Linear4bit._save_to_state_dict`` undoes its CPU inference packing through the inexact
    inverse conversion, in place, for good. PEFT calls ``state_dict()`` when it loads an adapter, so loading one
    after a generate changed the base model itself: on the demo model every layer's absmax moved and the base's
    logits by up to 0.5, even after the adapter was unloaded. A layer whose original
    :func:`remember_unpacked_4bit` kept now writes that original (bit for bit what was loaded) and keeps its
    packed inference layout (no repack on the next generate). Only packed layers with a kept original take the
    new path, so this is safe process-wide; it is installed once, when a 4-bit model is loaded on the CPU."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    original = Linear4bit._save_to_state_dict
    if getattr(original, "_ft_exact", False):
        return False

    def _save_to_state_dict(self, destination, prefix, keep_vars, _original=original):
        kept = getattr(self, "_ft_unpacked", None)
        packed = (self.weight.data, getattr(self.weight, "quant_state", None))
        if kept is None or not cpu_packed(packed[1]):
            return _original(self, destination, prefix, keep_vars)
        if keep_vars:  # the caller keeps the Parameter itself: it must hold the original, so unpack for good
            unpack_cpu_4bit(self)
            return _original(self, destination, prefix, keep_vars)
        self.weight.data, self.weight.quant_state = kept  # not packed: the original call leaves them as they are
        try:
            return _original(self, destination, prefix, keep_vars)
        finally:
            self.weight.data, self.weight.quant_state = packed

    _save_to_state_dict._ft_exact = True
    Linear4bit._save_to_state_dict = _save_to_state_dict
    return True


@contextlib.contextmanager
def training_layout(model):
    """Standard 4-bit layout while training (evaluation inside a run must not repack either);
    afterwards the fast inference packing is allowed again and happens on the next generate."""
    from .lean import attribute_set

    unpack_cpu_4bit(model)
    remember_unpacked_4bit(model)
    with attribute_set(_linear4bit_modules(model), "support_avx512bf16_for_cpu", False):
        yield


# --------------------------------------------------------------------------- stop and interrupt
class StopFlag:
    """Set by the Stop button, a kernel interrupt or the Python API; read at step boundaries."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stopped") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def interrupt_stops(flag: StopFlag, listeners):
    """While active, SIGINT (the kernel's interrupt) asks training to stop at the next step boundary
    (generation: at the next token) instead of raising mid-step. Three interrupts in a row restore the old
    behaviour and raise."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    count = {"n": 0}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        count["n"] += 1
        if count["n"] >= 3 and not getattr(flag, "saving", False):
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag.set("interrupted")
        msg = ("interrupt received: finishing the current step, then saving the adapter"
               if not getattr(flag, "saving", False) else "interrupt received while saving: the save completes first")
        emit(listeners, Message(msg, "warning"))

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- collator + callback
class Features:
    """The examples as the Trainer's map-style dataset: item ``i`` is ``examples[i].features()``.

    Not a ``datasets.Dataset``: that copied every token into an Arrow table, and needs the datasets package
    (about 80 MB of RSS with pyarrow and pandas) in the training process; see ``ft_magics._lean_imports``."""

    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i].features()


def padding_free_applies(model, handle, cfg: TrainConfig, listeners) -> bool:
    """Whether this run's batches may run padding-free (``padding_free``): SFT without packing, an attention
    that keeps a row's examples apart at their own cost, and a model that does keep them apart (asked with a
    forward pass, as packing asks: a model whose mask ignores restarting positions would let them mix)."""
    from .data import check_packing_isolation, padding_free_attention

    if not cfg.padding_free or cfg.pairs or cfg.packing or not padding_free_attention(model, handle.device):
        return False
    isolated, impl = check_packing_isolation(model, handle.tokenizer)
    if not isolated:
        emit(listeners, Message(f"padding_free: off for this model: its {impl} attention lets the examples of one "
                                "row see each other (checked with a forward pass); batches are padded"))
    return isolated


PADDING_FREE_ABOVE = 0.08  # padding share of a batch above which it runs padding-free (``padding_free``)


def padding_share(lengths: list) -> float:
    """The share of a right-padded batch of rows of these lengths that is padding."""
    return 1 - sum(lengths) / (len(lengths) * max(lengths)) if lengths else 0.0


class CountingCollator:
    """``DataCollatorForSeq2Seq`` plus a count of the loss-bearing tokens of each training batch it collates
    (host side, no sync). The run's loss-tokens/s counts the batches its optimizer steps trained on
    (:meth:`trained`): the data loader collates one batch ahead, and a 2-step run counted 3 batches."""

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None):
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="pt",
        )
        self.batch_loss_tokens: list = []  # per training batch, in the order collated
        self.batch_tokens: list = []  # the tokens each training batch runs (loss-bearing or not, no padding)
        self.counting = True  # off while an evaluation collates its batches (SpeedTrainer.evaluation_loop)
        self._trained = (0, 0, 0)  # (batches summed, their loss tokens, all their tokens)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.flatten_packed = False  # set for flash attention (core.data.packing_flattens)
        self.padding_free = False  # set where the attention keeps a flattened batch's examples apart

    def __call__(self, features):
        from .preference import unpaired

        features = unpaired(features)  # preference pairs: the chosen rows, then the rejected rows
        if self.counting:
            self.batch_loss_tokens.append(sum(sum(1 for x in f["labels"] if x != -100) for f in features))
            self.batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        if "position_ids" in features[0]:  # packed rows (core.data.pack): no attention mask, see collate_packed
            from .data import collate_packed

            return collate_packed(features, self.pad_token_id, flatten=self.flatten_packed)
        if self.padding_free and padding_share([len(f["input_ids"]) for f in features]) > PADDING_FREE_ABOVE:
            from .data import as_one_document, collate_packed

            return collate_packed([as_one_document(f) for f in features], self.pad_token_id, flatten=True)
        return self.inner([{"input_ids": f["input_ids"], "labels": f["labels"],
                            "attention_mask": [1] * len(f["input_ids"])} for f in features])


    @property
    def loss_tokens(self) -> int:
        """The loss-bearing tokens of every training batch collated so far."""
        return sum(self.batch_loss_tokens)

    def trained(self, batches: int) -> int:
        """The loss-bearing tokens of the first ``batches`` training batches: those the steps so far trained on."""
        done, loss_tokens, tokens = self._trained
        stop = min(batches, len(self.batch_loss_tokens))
        if stop > done:  # summed once each, as the steps go
            self._trained = (stop, loss_tokens + sum(self.batch_loss_tokens[done:stop]),
                             tokens + sum(self.batch_tokens[done:stop]))
        return self._trained[1]

    @property
    def trained_all_tokens(self) -> int:
        """Every token (not only loss-bearing ones) of the batches :meth:`trained` last counted."""
        return self._trained[2]


def _auto_chunk_rows(model, checkpointed: bool) -> int:
    """The chunked loss's rows per chunk for this run (0: the loss decides, for a head it cannot read)."""
    from .speed import auto_chunk_rows

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return auto_chunk_rows(weight.shape[0], checkpointed=checkpointed) if weight is not None else 0


def _resumed(checkpoint, meta: dict) -> Optional[dict]:
    """What a resumed run's record says of its start: the step it resumed at (its timings are the resumed
    part's), and the data and the step-shaping settings the earlier steps ran with where they were not this
    run's. Read when the run begins: its own checkpoints replace that one as it goes."""
    if checkpoint is None:
        return None
    from .checkpoints import checkpoint_step, earlier_settings, read_meta

    before = read_meta(checkpoint)
    out = {"at": checkpoint_step(checkpoint)}
    if before.get("data_fingerprint") and before["data_fingerprint"] != meta.get("data_fingerprint"):
        out["earlier_data"] = before.get("data_source") or "other data"
    changed = earlier_settings(before.get("settings") or {}, meta.get("settings") or {})
    if changed:
        out["earlier_settings"] = changed
    if before.get("resumed"):  # the run that made the checkpoint was itself resumed: its steps before that
        out["before"] = before["resumed"]
    return out


def example_tokens(example) -> int:
    """The tokens a training example puts through the model (both sides of a preference pair)."""
    return len(example.input_ids) + len(getattr(example, "rejected_input_ids", None) or ())


def eta_seconds(elapsed: float, steps_done: int, steps_left: int, tokens_done: int,
                tokens_per_step: Optional[float]) -> float:
    """Time left: the time per token so far times the tokens the steps left are expected to run, where the
    tokens are known; else the time per step so far. Length-grouped batches run the longest first, so the
    time per step of the first steps overstated what was left many times over (a 5-step run said "20:55
    left" after step 1 with 2 minutes to go)."""
    if steps_left <= 0:
        return 0.0
    if tokens_done > 0 and tokens_per_step:
        return elapsed / tokens_done * tokens_per_step * steps_left
    return elapsed / max(steps_done, 1) * steps_left


def _make_callback(run_name, listeners, flag: StopFlag, collator: CountingCollator, history: dict, device: str,
                   begin_info: dict, peak_mark: Optional[int] = None, tokens_per_step: Optional[float] = None,
                   eval_tokens: int = 0):
    from transformers import TrainerCallback

    class EventCallback(TrainerCallback):
        """Trainer hooks -> ft_magics events; the stop flag -> ``control.should_training_stop``."""

        def __init__(self):
            self.t0 = None
            self.peak = 0
            self.last_mem_t = 0.0
            self.mem = None
            self.step_at_start = 0
            self.step_end_t = None  # when the last step ended: an evaluation runs from then to on_evaluate
            self.evaluations: list = []  # each evaluation's seconds, kept out of the steps' time and rate

        def step_seconds(self, now: float) -> float:
            """The time the steps took: the run's time less its evaluations (a 12-minute evaluation on a slow
            machine had the rate read 1 loss-tok/s where the steps ran at 5)."""
            return now - self.t0 - sum(self.evaluations)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.step_at_start = state.global_step  # a resumed run collates from its resumed step on
            emit(listeners, TrainBegin(total_steps=state.max_steps, **begin_info))

        def trained_tokens(self, args, state) -> int:
            batches = (state.global_step - self.step_at_start) * args.gradient_accumulation_steps
            history["loss_tokens"] = collator.trained(batches)
            return history["loss_tokens"]

        def on_step_end(self, args, state, control, **kw):
            if flag.is_set():
                control.should_training_stop = True
            last = control.should_training_stop or state.global_step >= state.max_steps
            if last and state.global_step % max(int(args.logging_steps), 1):  # log_every > 1: the steps since the
                control.should_log = True  # last log are read too, or the run's final loss is an earlier window's
            now = time.perf_counter()
            if now - self.last_mem_t > 0.25:
                self.mem = read_memory(device, self.peak, since=peak_mark)
                self.peak = max(self.peak, self.mem.peak_bytes)
                self.last_mem_t = now
            history["last_step"] = state.global_step
            history["train_seconds"] = self.step_seconds(now)  # the steps' time, as the progress lines' rate counts it
            self.trained_tokens(args, state)
            self.step_end_t = now
            return control

        def on_evaluate(self, args, state, control, **kw):
            if self.step_end_t is not None and not history.get("final_eval"):
                self.evaluations.append(time.perf_counter() - self.step_end_t)
                self.step_end_t = None
            return control

        def evals_left(self, args, step: int, max_steps: int) -> int:
            """The evaluations still to come: every eval_steps, and the final one after the last step where the
            schedule does not evaluate that step (run_training's)."""
            if not eval_tokens:
                return 0
            strategy = getattr(args, "eval_strategy", None)
            every = int(args.eval_steps or 0) if getattr(strategy, "value", strategy) == "steps" else 0
            scheduled = max_steps // every - (step - 1) // every if every >= 1 else 0  # (this step's comes after)
            return scheduled + (1 if every < 1 or max_steps % every else 0)

        def eval_seconds(self, elapsed: float) -> Optional[float]:
            """An evaluation's time: the last one's; before any, its tokens at the training's time per token over
            3 (a forward alone, where a step also runs the backward, about twice the forward)."""
            if self.evaluations:
                return self.evaluations[-1]
            done = collator.trained_all_tokens
            return elapsed / done * eval_tokens / 3 if done > 0 and eval_tokens else None

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            step = state.global_step
            elapsed = self.step_seconds(time.perf_counter())
            if "loss" in logs:
                loss = float(logs["loss"])
                history["loss"].append([step, loss])
                lb = self.trained_tokens(args, state)
                eta = eta_seconds(elapsed, step - self.step_at_start, state.max_steps - step,
                                  collator.trained_all_tokens, tokens_per_step)
                per_eval = self.eval_seconds(elapsed) if eta is not None else None
                if per_eval is not None:  # the evaluations still to come, at the pace of the last (or estimated)
                    eta += per_eval * self.evals_left(args, step, state.max_steps)
                emit(listeners, StepEnd(
                    step=step, total_steps=state.max_steps, epoch=float(logs.get("epoch", state.epoch or 0.0)),
                    loss=loss, learning_rate=_f(logs.get("learning_rate")), grad_norm=_f(logs.get("grad_norm")),
                    elapsed_s=elapsed, eta_s=eta,
                    tokens_per_s=lb / elapsed if elapsed > 0 else None, memory=self.mem,
                    pairs_right=_f(logs.get("pairs_right")),
                ))
                if control.should_evaluate and not history.get("final_eval"):  # (quiet until its loss, before)
                    emit(listeners, Message(f"evaluating at step {step}; its loss follows (loss-tok/s counts the "
                                            "steps' time only)"))
            if "eval_loss" in logs:
                history["eval"].append([step, float(logs["eval_loss"])])
                emit(listeners, EvalEnd(step=step, eval_loss=float(logs["eval_loss"]),
                                        metrics={k: v for k, v in logs.items() if k.startswith("eval_")}))

    return EventCallback()


class BestKeeper:
    """``keep_best`` / ``early_stopping``: a copy (on the CPU) of the adapter's weights at the lowest eval loss
    so far, put back before the adapter is saved; and the stop once ``early_stopping`` evaluations in a row
    found no lower loss. Works from the Trainer's evaluations, the final one included. Every checkpoint holds
    the best so far (:attr:`FILE`, written before the checkpoint is marked complete), so a resumed run goes on
    comparing with the evaluations made before the interruption."""

    FILE = "ft_best.safetensors"  # in a checkpoint folder: the best weights so far, the bookkeeping as metadata

    def __init__(self, peft_model, cfg: TrainConfig):
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.patience = int(cfg.early_stopping)
        self.best: Optional[tuple] = None  # (eval loss, step)
        self.weights: Optional[list] = None
        self.evaluations = 0
        self.since_best = 0
        self.stopped_at: Optional[int] = None
        self.last_step_seen: Optional[int] = None  # the step whose weights the model holds at the last evaluation

    def consider(self, step: int, loss: Optional[float]) -> bool:
        """Record an evaluation; whether training should stop now."""
        import math

        self.evaluations += 1
        self.last_step_seen = step
        if loss is not None and math.isfinite(loss) and (self.best is None or loss < self.best[0]):
            self.best, self.since_best = (loss, step), 0
            self.weights = [p.detach().to("cpu", copy=True) for p in self.params]
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience and self.stopped_at is None:
            self.stopped_at = step
            return True
        return False

    def callback(self):
        from transformers import TrainerCallback

        keeper = self

        class KeepBest(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kw):
                if keeper.consider(state.global_step, _f((metrics or {}).get("eval_loss"))):
                    control.should_training_stop = True
                return control

            def on_save(self, args, state, control, **kw):  # before checkpoints' callback marks it complete
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if state.is_world_process_zero and folder.is_dir():
                    keeper.save(folder)
                return control

        return KeepBest()

    def save(self, folder: Path) -> None:
        """Write the best so far into checkpoint ``folder`` (atomically; nothing before the first evaluation)."""
        if self.best is None:
            return
        from safetensors.torch import save

        from .atomic import atomic_write_bytes

        state = {"loss": self.best[0], "step": self.best[1], "evaluations": self.evaluations,
                 "since_best": self.since_best, "last_step_seen": self.last_step_seen}
        atomic_write_bytes(Path(folder) / self.FILE,
                           save(dict(zip(self.names, self.weights)), metadata={"ft_magics_best": json.dumps(state)}))

    def load(self, folder: Path) -> bool:
        """Take up the best that checkpoint ``folder`` holds; False when it holds none (no evaluation yet)."""
        from safetensors import safe_open

        path = Path(folder) / self.FILE
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["ft_magics_best"])
            self.weights = [f.get_tensor(n) for n in self.names]
        self.best = (float(state["loss"]), int(state["step"]))
        self.evaluations, self.since_best = int(state["evaluations"]), int(state["since_best"])
        self.last_step_seen = state.get("last_step_seen")
        return True

    def restore(self, last_step: int) -> Optional[str]:
        """Put the best weights back where the model holds others; a line saying what was kept (None: nothing
        to say, the last step was the best or nothing was evaluated)."""
        import torch

        if self.best is None:
            return None
        loss, step = self.best
        if step == last_step and self.last_step_seen == last_step:
            return None
        with torch.no_grad():
            for p, w in zip(self.params, self.weights):
                p.copy_(w.to(p.device))
        return (f"kept the adapter as it was at step {step} (eval loss {loss:.4f}, the lowest of "
                f"{self.evaluations} evaluations), not as step {last_step} left it")


def _last_step_evaluated(history: dict) -> bool:
    """Whether the run's last step has an evaluation recorded (the Trainer's own, with eval_steps)."""
    return bool(history["eval"]) and history["eval"][-1][0] == history["last_step"]


def _f(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- the job
@dataclass
class TrainResult:
    name: str
    status: str
    adapter_path: Optional[str]
    steps: int
    final_loss: Optional[float]
    first_loss: Optional[float]
    eval_loss: Optional[float]
    seconds: float
    trainable_params: int
    total_params: int
    loss_tokens_per_s: Optional[float]
    peak_memory_bytes: int
    record: dict = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


def lora_config(model, cfg: TrainConfig):
    from peft import LoraConfig

    targets = resolve_target_modules(model, cfg.target_modules)
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        # GPT-2's Conv1D layers store the weight transposed: PEFT sets this itself, with a UserWarning per run
        fan_in_fan_out=_all_conv1d(model, targets),
    )


def _all_conv1d(model, targets) -> bool:
    """Whether every layer ``targets`` names is a transformers ``Conv1D`` (GPT-2 in 16 or 32 bits)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without it has no such layers
        return False
    import torch

    if targets == "all-linear":  # PEFT's: every linear layer but the output head
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hit = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    else:
        names = {targets} if isinstance(targets, str) else set(targets or ())
        hit = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    return bool(hit) and all(isinstance(m, Conv1D) for m in hit)


def attach_adapter(model, name: str, cfg: TrainConfig, on_model: Optional[Callable] = None):
    """Add a fresh LoRA adapter ``name`` (replacing one of that name) and make it the trainable one.
    ``on_model`` gets the model left once a replaced adapter is dropped (the plain base, when it was the only
    one), so its holder never keeps a wrapper whose layers are gone; an attach that fails or is interrupted
    part-way takes the new adapter's layers out again."""
    import torch
    from peft import PeftModel, get_peft_model

    from .adapters import drop_adapter, strip_lora

    torch.manual_seed(cfg.seed)  # reproducible adapter initialisation
    if isinstance(model, PeftModel) and name in model.peft_config:
        model = drop_adapter(model, name)  # replaced: the plain base model when it was the only one
        if on_model is not None:
            on_model(model)
    try:
        if isinstance(model, PeftModel):
            base = model.get_base_model()
            lcfg = lora_config(base, cfg)
            model.add_adapter(name, lcfg)
            # 'base' selected (every LoRA layer switched off) must not leave the new adapter off: its LoRA path
            # would never run, and the first backward would find nothing that requires grad
            model.base_model.enable_adapter_layers()
            model.set_adapter(name)
            peft_model = model
        else:
            lcfg = lora_config(model, cfg)
            peft_model = get_peft_model(model, lcfg, adapter_name=name)
    except BaseException:
        if not isinstance(model, PeftModel):
            strip_lora(model)
        elif name in model.peft_config:
            drop_adapter(model, name)
        raise
    # Only the new adapter trains; the others (and the base) stay frozen.
    for n, p in peft_model.named_parameters():
        p.requires_grad = (".lora_" in n and f".{name}." in n)
    return peft_model


def initial_adapter(cfg: TrainConfig, adapters_dir: Path) -> Optional[Path]:
    """The adapter folder ``init_from`` names (None when it is unset): an adapter's name in ``adapters_dir`` or a
    folder's path. Its rank and kind are checked against ``cfg`` here, before the model is touched."""
    if not cfg.init_from:
        return None
    from ..paths import user_path

    ref = str(cfg.init_from)
    path = user_path(ref)
    looks_like_path = path.is_absolute() or any(sep in ref for sep in ("/", "\\")) or ref.startswith(".")
    found = next((p for p in ([path] if looks_like_path else [Path(adapters_dir) / ref, path])
                  if (p / "adapter_config.json").is_file()), None)
    if found is None:
        names = sorted(p.name for p in Path(adapters_dir).glob("*") if (p / "adapter_config.json").is_file())
        raise FtUsageError(
            f"init_from: {ref!r} is neither an adapter in {adapters_dir}{did_you_mean(ref, names)} nor a folder "
            "holding adapter_config.json. Give a trained adapter's name"
            + (f" ({', '.join(names[:10])})" if names else "") + " or its folder.")
    saved = json.loads((found / "adapter_config.json").read_text())
    mismatch = [f"{k} {saved.get(k)} there, {v} here" for k, v in (("r", cfg.r), ("use_dora", cfg.use_dora))
                if saved.get(k, False if k == "use_dora" else None) != v]
    if mismatch:
        raise FtUsageError(
            f"init_from: the adapter in {found} has another shape ({'; '.join(mismatch)}): starting from it needs the "
            f"same r and kind. Set r: {saved.get('r')}" + (f" and use_dora: {saved.get('use_dora')}" if
                                                          saved.get("use_dora") != cfg.use_dora else "")
            + ", or train from a fresh adapter (no init_from).")
    return found


def load_initial_weights(peft_model, name: str, folder: Path, cfg: TrainConfig) -> None:
    """Copy the weights of the adapter in ``folder`` into the freshly attached adapter ``name``: every one of the
    new adapter's LoRA tensors must be found there, and every tensor there must have a place (the same layers)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .adapters import read_adapter_folder

    read_adapter_folder(folder)  # a complete, readable adapter (its weights file, no pickles)
    state = load_file(str(folder / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    except RuntimeError as exc:  # a size mismatch: other layer widths (another base model)
        raise FtUsageError(f"init_from: the adapter in {folder} does not fit this model's layers "
                           f"({str(exc).splitlines()[0][:200]}): was it trained on another base model?") from None
    wanted = {n for n, _ in peft_model.named_parameters() if ".lora_" in n and f".{name}." in n}
    missing = [n for n in getattr(result, "missing_keys", []) if n in wanted]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        layer = (missing or unexpected)[0]
        raise FtUsageError(
            f"init_from: the adapter in {folder} adapts other layers than this run (target_modules: "
            f"{cfg.target_modules}): {'no weights there for' if missing else 'weights there for no layer here:'} "
            f"{layer}. Set target_modules as it was trained, or train from a fresh adapter.")


def trainable_counts(peft_model, base_params: int) -> tuple[int, int]:
    """``(trainable parameters, the model's with them)``: the adapter counts in the whole, as PEFT counts it, so
    the share never passes 100% (r=64 on a tiny model read '131,072 of 99,648 (131.54%)')."""
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return trainable, base_params + trainable


AUTO_CHECKPOINTING_SHARE = 0.5  # gradient_checkpointing: auto turns it on above this share of free memory


def checkpointing_for(cfg: TrainConfig, model, device: str, examples: list, free: Optional[int] = None):
    """(on, why): ``gradient_checkpointing`` as set, or for ``auto`` on when the longest batch's activations
    without it - estimated by the planner's formula (core.planner.activation_bytes, validated against measured
    peaks within 25%) - would take more than half the memory free now. ``why`` is empty unless auto decided."""
    if cfg.gradient_checkpointing != "auto":
        return bool(cfg.gradient_checkpointing), ""
    from .memory import human_bytes, read_memory

    longest, need = _activations(cfg, model, examples, checkpointing=False)
    if need is None:  # not a config the planner reads: keep it off
        return False, "auto: off (the model's size could not be read to estimate its activations)"
    free = read_memory(device).available_bytes if free is None else free  # the figure the dashboard shows
    on = need > AUTO_CHECKPOINTING_SHARE * free
    return on, (f"auto: {'on' if on else 'off'} - the longest batch ({batch_rows(cfg, examples)} x {longest} tokens) needs "
                f"about {human_bytes(need)} of activations without it, {human_bytes(free)} is free")


def _activations(cfg: TrainConfig, model, examples: list, checkpointing: bool):
    """``(longest row, bytes of activations of the longest batch)`` by the planner's formula (validated
    against measured peaks within 25%); the bytes are None where the model's config is not one it reads."""
    from .planner import activation_bytes, dims_from_config

    longest = min(max((len(e.input_ids) for e in examples), default=1), cfg.max_seq_len)
    try:
        dims = dims_from_config(getattr(model, "config", None).to_dict())
    except (AttributeError, KeyError, TypeError, ValueError):
        return longest, None
    return longest, activation_bytes(dims, longest, batch_rows(cfg, examples), checkpointing, cfg.chunked_loss,
                                     lora_dropout=cfg.dropout > 0)


def batch_rows(cfg: TrainConfig, examples: Optional[list] = None) -> int:
    """Rows of a training batch: batch_size examples (or all of ``examples``, where fewer), each pair of a
    preference run being two rows."""
    from ..config import rows_per_example

    rows = cfg.batch_size if examples is None else min(cfg.batch_size, max(len(examples), 1))
    return rows * rows_per_example(cfg.objective)


def check_batch_fits(cfg: TrainConfig, model, device: str, examples: list, free: Optional[int] = None) -> None:
    """On the CPU, refuse a batch whose activations (as this run will hold them) would not fit the free
    memory: there the kernel would be killed, where CUDA raises an error that the run recovers from."""
    from .memory import human_bytes, read_memory

    if str(device).startswith("cuda"):
        return
    longest, need = _activations(cfg, model, examples, checkpointing=bool(cfg.gradient_checkpointing))
    free = read_memory(device).available_bytes if free is None else free
    if need is None or not free or need <= free:
        return
    advice = ("a smaller batch_size with a larger grad_accum (the same effective batch), or a shorter max_seq_len"
              + ("" if cfg.gradient_checkpointing else ", or gradient_checkpointing: true")
              + ("" if cfg.auto_batch_size else " (auto_batch_size: true lowers the batch until it fits)"))
    raise FtUsageError(
        f"the longest batch ({batch_rows(cfg, examples)} x {longest} tokens) needs about {human_bytes(need)} of activations"
        f"{' even with gradient checkpointing' if cfg.gradient_checkpointing else ''}, and {human_bytes(free)} is "
        f"free: on the CPU running out of memory ends the kernel. Use {advice}.")


# config keys of mixture-of-experts models: an expert no token reached in a step has unused LoRA weights
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _training_args(cfg: TrainConfig, out_dir: str, device: str, compute_dtype, has_eval: bool,
                   model_config=None):
    import torch
    from transformers import TrainingArguments

    on_cuda = device.startswith("cuda")
    kw = dict(
        output_dir=out_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        optim="adamw_torch_fused" if cfg.optimizer == "adamw" else cfg.optimizer,
        neftune_noise_alpha=cfg.neftune_noise_alpha or None,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.log_every,
        logging_first_step=True,
        save_strategy="no",  # checkpoints.make_callback decides when (steps, minutes, on stop)
        save_total_limit=2,  # the previous complete checkpoint survives while the next is written
        auto_find_batch_size=cfg.auto_batch_size,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not on_cuda,
        bf16=on_cuda and compute_dtype == torch.bfloat16,
        fp16=on_cuda and compute_dtype == torch.float16,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps or None,
        label_names=["labels"],
        # under several processes DDP otherwise searches the autograd graph for unused weights every step (the
        # Trainer cannot tell a PEFT model uses them all) and every rank logs a warning that it found none
        ddp_find_unused_parameters=any(getattr(model_config, k, None) for k in MOE_CONFIG_KEYS),
        **cfg.warmup_kwargs(),
    )
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)
    import inspect

    ckpt = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters \
        else "gradient_checkpointing"
    kw[ckpt] = cfg.gradient_checkpointing
    kw[f"{ckpt}_kwargs"] = {"use_reentrant": False} if cfg.gradient_checkpointing else None
    return TrainingArguments(**kw)


def save_adapter(peft_model, name: str, target: Path, record: dict) -> Path:
    """Write the adapter in PEFT's own format, the run record and its loss curve (``loss_curve.svg``, with
    or without a dashboard), atomically."""
    from .adapters import save_peft_adapter
    from .chart import CURVE_FILE, curve_svg

    return save_peft_adapter(peft_model, name, target, record, files={CURVE_FILE: curve_svg(record)})


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "ft-magics"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def preflight(handle, cfg: TrainConfig, train_examples: list) -> tuple:
    """The memory checks a run makes before it touches the model (the adapter, the batch, whether gradient
    checkpointing goes on): ``(cfg as the run will train, why checkpointing was switched on, or "")``."""
    if cfg.use_dora:
        check_dora_supported(handle.bits, handle.device)
    free = read_memory(handle.device).available_bytes  # one reading for the three decisions
    check_adapter_fits(handle.model, cfg, handle.device, free)
    ckpt_on, ckpt_why = checkpointing_for(cfg, handle.model, handle.device, train_examples, free)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=ckpt_on)  # what this run does, recorded as such
    notes = []
    asked = cfg.batch_size
    while cfg.auto_batch_size and cfg.batch_size > 1 and not str(handle.device).startswith("cuda"):
        try:  # on the CPU an out-of-memory ends the kernel: auto_batch_size lowers the batch before, not after
            check_batch_fits(cfg, handle.model, handle.device, train_examples, free)
            break
        except FtUsageError:
            cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2)
    if cfg.batch_size != asked:
        notes.append(f"auto_batch_size: batch_size {asked} would not fit in the free memory; training with batch_size "
                     f"{cfg.batch_size}.")
    elif cfg.auto_batch_size:  # said either way: a setting that did nothing looked as if it was not read
        notes.append(f"auto_batch_size: batch_size {asked} fits"
                     + (" with gradient checkpointing on" if ckpt_on else "")
                     + ("; on CUDA a batch that runs out of memory mid-run is halved and retried."
                        if str(handle.device).startswith("cuda") else " in the free memory; kept."))
    check_batch_fits(cfg, handle.model, handle.device, train_examples, free)
    return cfg, ckpt_why, notes


def run_notes(cfg: TrainConfig, examples: int, device: str) -> list:
    """Settings that this run cannot do as written: a warm-up as long as the run (the learning rate never
    reaches the one asked for), a paged optimizer off CUDA (bitsandbytes runs it unpaged, with a library warning)."""
    notes = []
    steps = planned_steps(cfg, examples)
    warm = int(cfg.warmup) if cfg.warmup >= 1 else 0  # a fraction is of the steps: always shorter than the run
    if warm >= steps and cfg.lr_scheduler != "constant":
        notes.append(f"warmup: {warm} steps is as long as the run ({counted(steps, 'step')}): the learning rate only "
                     f"climbs, and never reaches {cfg.learning_rate:g}. Use a shorter warmup (e.g. warmup: 0.03, a "
                     "fraction of the steps) or more steps.")
    if 0 < examples < cfg.batch_size:  # the Trainer's last (here: only) batch is what is left, not padded to size
        notes.append(f"batch_size {cfg.batch_size} is more than the {counted(examples, 'training row')}: each step "
                     f"trains on all {examples} at once, so batch_size: {examples} says what happens.")
    if str(cfg.optimizer).startswith("paged_") and not str(device).startswith("cuda"):
        notes.append(f"optimizer: {cfg.optimizer} pages its states to the CPU on CUDA; on {device} bitsandbytes runs "
                     "it without paging (the same arithmetic, nothing to page).")
    if cfg.lr_scheduler == "constant" and cfg.warmup != TrainConfig().warmup:
        notes.append(f"lr_scheduler: constant has no warm-up, so warmup: {cfg.warmup:g} is not used; "
                     "lr_scheduler: constant_with_warmup warms up, then holds the rate.")
    if not cfg.pairs:
        unused = [k for k in ("beta", "simpo_gamma") if getattr(cfg, k) != getattr(TrainConfig(), k)]
        if unused:
            notes.append(f"{' and '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} to preference objectives "
                         f"(dpo, orpo, ipo, simpo); objective: {cfg.objective} does not use "
                         f"{'them' if len(unused) > 1 else 'it'}.")
    return notes


def learned_positions(model) -> bool:
    """Whether ``model`` reads positions from an embedding table (GPT-2's wpe, OPT's embed_positions): past its
    rows a longer row fails with an IndexError, where rotary or ALiBi positions only degrade."""
    import torch

    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return any(isinstance(m, torch.nn.Embedding) and m is not inputs
               and name.rsplit(".", 1)[-1] in ("wpe", "embed_positions", "position_embeddings", "pos_emb")
               for name, m in model.named_modules())


def fit_context(cfg: TrainConfig, model) -> tuple:
    """``(cfg, note)``: the default max_seq_len lowered to a model that reads fewer tokens (as %lora_eval does), a
    larger one given for a model with learned positions refused (its rows past them cannot run: GPT-2 with 64
    positions crashed in the first step with an IndexError); otherwise as given (rotary positions run past the
    context, and a long-context fine-tune may mean to: the data report warns)."""
    from .inference import context_limit

    window = context_limit(model)
    if not window or cfg.max_seq_len <= window or window < 16:
        return cfg, None
    default = TrainConfig().max_seq_len
    if cfg.max_seq_len == default:
        return dataclasses.replace(cfg, max_seq_len=window), (
            f"max_seq_len {default} (the default) is beyond the model's context ({window:,} tokens, its "
            f"max_position_embeddings): this run uses max_seq_len {window}.")
    if learned_positions(model):
        raise FtUsageError(
            f"max_seq_len {cfg.max_seq_len:,} is beyond the model's {window:,} learned positions (a table of "
            f"{window:,} position embeddings): rows longer than that cannot run. Set max_seq_len: {window} or less "
            "(overlong: truncate, drop or split decides what happens to longer examples).")
    return cfg, None


def run_checks(cfg: TrainConfig, train_examples: list, eval_examples: list, device: str) -> list:
    """What a run refuses before it starts (raised) and the notes it prints (returned): the same for --dry-run."""
    if (cfg.keep_best or cfg.early_stopping) and not eval_examples:
        raise FtUsageError(f"{'early_stopping' if cfg.early_stopping else 'keep_best'} compares eval losses, and this "
                           "run has no eval data: give --eval FILE (or eval_fraction: 0.1 in the body).")
    return run_notes(cfg, len(train_examples), device)


def planned_steps(cfg: TrainConfig, examples: int) -> int:
    """Optimizer steps the Trainer will take (one process): max_steps, else epochs over batches of
    batch_size x grad_accum, as transformers counts them."""
    import math

    if cfg.max_steps > 0:
        return int(cfg.max_steps)
    per_epoch = max(1, math.ceil(math.ceil(examples / cfg.batch_size) / cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


def run_training(
    handle,
    name: str,
    train_examples: list,
    eval_examples: list,
    cfg: TrainConfig,
    target: Path,
    listeners: list,
    flag: Optional[StopFlag] = None,
    data_report=None,
    background: bool = False,
    on_model: Optional[Callable[[Any], None]] = None,
    resume: bool = False,
    job: Optional[Path] = None,
) -> TrainResult:
    """Train adapter ``name`` on ``handle``'s model; save it to ``target``. Returns a :class:`TrainResult`.
    ``job``: the job file this run trains (``ft_magics.train``), which a stopped run's resume hint names.

    ``on_model`` receives the PEFT-wrapped model as soon as it exists, so the session holds it even if
    training fails halfway.
    """
    flag = flag or StopFlag()
    notes = run_checks(cfg, train_examples, eval_examples, handle.device)
    started = time.time()
    t0 = time.perf_counter()
    handle.tokenizer.padding_side = "right"
    cfg, ckpt_why, batch_notes = preflight(handle, cfg, train_examples)
    notes += batch_notes
    ckpt_on = cfg.gradient_checkpointing
    if ckpt_on and ckpt_why:
        emit(listeners, Message(f"gradient checkpointing {ckpt_why} (set gradient_checkpointing: false to keep it off)"))
    model_config = getattr(handle.model, "config", None)
    for note in notes:
        emit(listeners, Message(note, "warning"))
    use_cache = getattr(model_config, "use_cache", None)  # the Trainer turns the KV cache off; put it back after
    # DoRA sets its magnitudes from the base weights as it attaches: read in the standard 4-bit layout, not
    # one a generate repacked for bitsandbytes' CPU kernel (PEFT dequantises that as garbage)
    unpack_cpu_4bit(handle.model)
    start = initial_adapter(cfg, target.parent) if not resume else None  # found before the model is touched
    peft_model = attach_adapter(handle.model, name, cfg, on_model)
    if on_model is not None:
        on_model(peft_model)
    if start is not None:
        load_initial_weights(peft_model, name, start, cfg)
        emit(listeners, Message(f"{name!r} starts from the weights of the adapter in {start} (init_from), not from "
                                "a fresh adapter; that folder is left as it is."))
    trainable, total = trainable_counts(peft_model, handle.param_count)
    history: dict = {"loss": [], "eval": [], "last_step": 0}
    collator = CountingCollator(handle.tokenizer)
    from .data import packing_flattens

    collator.flatten_packed = packing_flattens(peft_model)
    collator.padding_free = padding_free_applies(peft_model, handle, cfg, listeners)
    train_ds = Features(train_examples)
    eval_ds = Features(eval_examples) if eval_examples else None
    settings = cfg.to_dict()
    if cfg.pairs:
        settings["beta"] = cfg.pair_beta  # the run's record says the beta it used
    if ckpt_why:
        settings["gradient_checkpointing_auto"] = ckpt_why
    begin_info = dict(
        run_name=name, num_examples=len(train_examples), trainable_params=trainable, total_params=total,
        device=handle.device, settings=settings, background=background,
        packed_examples=data_report.packed_examples if cfg.packing and data_report is not None else None,
    )
    peak_mark = reset_peak(handle.device)
    # a step's expected tokens: the mean example's, batch_size x grad_accum times (each process its own batches)
    tokens_per_step = (sum(example_tokens(f) for f in train_examples) / len(train_examples)
                       * cfg.batch_size * cfg.grad_accum if train_examples else None)
    callback = _make_callback(name, listeners, flag, collator, history, handle.device, begin_info, peak_mark,
                              tokens_per_step, sum(example_tokens(f) for f in eval_examples or ()))
    ckpt_dir = target.parent / ".checkpoints" / name
    from . import checkpoints as ckpts

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)  # processes of this run (a job's ranks), for resuming
    ckpt_meta = {"name": name, "settings": settings, "data_fingerprint": getattr(data_report, "fingerprint", None),
                 "data_source": getattr(data_report, "source", None), "processes": world,
                 "global_batch": cfg.batch_size * cfg.grad_accum * world}
    resume_from = ckpts.begin(ckpt_dir, name, resume, listeners, ckpt_meta)
    resumed = _resumed(resume_from, ckpt_meta)
    if resumed:  # this run's checkpoints carry it, so a resume of a resumed run keeps the earlier one too
        ckpt_meta["resumed"] = resumed
    if resume_from is not None:  # the resumed run's record keeps the whole curve
        history["loss"], history["eval"] = ckpts.prior_losses(resume_from), ckpts.prior_evals(resume_from)
    args = _training_args(cfg, str(ckpt_dir), handle.device, handle.dtype, eval_ds is not None, model_config)
    # make_trainer: the chunked loss (no full-vocabulary logits for the batch) and the other speed levers
    from .speed import drop_optimizer_state, holding_loss_blocks, make_trainer, schedule_as_set

    keeper = BestKeeper(peft_model, cfg) if (cfg.keep_best or cfg.early_stopping) else None
    if keeper is not None and resume_from is not None:
        keeper.load(resume_from)
    trainer = make_trainer(
        peft_model, cfg.chunked_loss, cfg.loss_chunk_rows or _auto_chunk_rows(peft_model, ckpt_on),
        autocast_dtype=handle.dtype if cfg.autocast else None,
        lean_steps=cfg.lean_steps, causal_mask_only=cfg.causal_mask_only,
        preference=(cfg.objective, cfg.pair_beta, cfg.simpo_gamma) if cfg.pairs else None, args=args, train_dataset=train_ds,
        eval_dataset=eval_ds, data_collator=collator,
        # the best weights go into a checkpoint before its callback marks it complete
        callbacks=[schedule_as_set(lambda text: emit(listeners, Message(text, "warning"))), callback]
        + ([keeper.callback()] if keeper is not None else []) + [ckpts.make_callback(cfg, flag, ckpt_meta, listeners)],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # our views report progress; no raw log dicts
        trainer.remove_callback(cb)
    # One SIGINT handler from the first step until the adapter is saved: an interrupt that lands between
    # training and saving must not fall through to the default handler (a KeyboardInterrupt mid-save).
    sigint = contextlib.ExitStack()
    sigint.enter_context(interrupt_stops(flag, listeners))
    ckpts.mark_running(ckpt_dir)  # till the end: another kernel's list does not call this run cut short
    try:
        status, error, eval_loss, caught = "completed", None, None, None
        eval_step = None  # the step the eval loss reported was measured at
        try:
            from .fused_lora import fused_lora
            from .lean import lean_activations

            from .memory import heap_for_training

            with training_layout(peft_model), lean_activations(peft_model, cfg.lean_activations), \
                    fused_lora(peft_model, cfg.fused_lora), heap_for_training(handle.device, cfg.heap_reuse), \
                    holding_loss_blocks(trainer):  # the final evaluation reuses the training's logits blocks
                peft_model.train()
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                if flag.is_set():
                    status = flag.reason or "stopped"
                if eval_ds is not None and status == "completed" and not _last_step_evaluated(history):
                    # the time left said 0:00 at the last step, while this evaluation could take a while more
                    emit(listeners, Message(f"the last step is done: evaluating on {counted(len(eval_ds), 'eval example')}, "
                                            "then saving the adapter"))
                    drop_optimizer_state(trainer)  # no step follows; the evaluation reuses that memory
                    history["final_eval"] = True
                    metrics = trainer.evaluate()
                    eval_loss, eval_step = _f(metrics.get("eval_loss")), history["last_step"]
                    if eval_loss is not None and not _last_step_evaluated(history):  # the callback usually has
                        history["eval"].append([history["last_step"], eval_loss])
                        emit(listeners, EvalEnd(step=history["last_step"], eval_loss=eval_loss, metrics=metrics))
                elif history["eval"]:
                    eval_step, eval_loss = history["eval"][-1]
        except KeyboardInterrupt:
            status = "interrupted"
        except Exception as exc:  # noqa: BLE001 - the run ends cleanly and says why; the caller re-raises
            status, error, caught = "failed", f"{type(exc).__name__}: {exc}", exc
            from .oom import free_after_oom, is_oom, oom_error

            if is_oom(exc):  # free the failed step's memory; tell the user what to change
                free_after_oom(trainer)
                caught, error = oom_error(exc, cfg, handle.bits, handle.device), f"out of memory: {exc}"
        finally:
            peft_model.eval()
            if use_cache is not None:
                model_config.use_cache = use_cache
        seconds = time.perf_counter() - t0
        steps = history["last_step"]
        losses = [l for _, l in history["loss"]]
        best = None
        if keeper is not None and status != "failed":
            if keeper.stopped_at is not None:
                emit(listeners, Message(f"early stopping: {keeper.patience} evaluation"
                                        f"{'s' if keeper.patience != 1 else ''} in a row without a lower eval loss; "
                                        f"stopped at step {keeper.stopped_at}."))
            kept = keeper.restore(steps)
            if keeper.best is not None:
                best = {"step": keeper.best[1], "eval_loss": keeper.best[0], "restored": kept is not None,
                        "early_stopped_at": keeper.stopped_at}
                eval_loss, eval_step = keeper.best  # the saved adapter's
            if kept:
                emit(listeners, Message(kept))
        mem = read_memory(handle.device, callback.peak, since=peak_mark)
        trained_tokens = history.get("loss_tokens", 0)
        train_seconds = history.get("train_seconds") or seconds  # not the set-up and the save around the steps
        lt_s = (trained_tokens / train_seconds) if train_seconds > 0 else None
        record = {
            "name": name,
            "status": status,
            "error": error,
            "base_model": {"name": handle.name, "source": handle.source, "bits": handle.bits,
                           "dtype": str(handle.dtype).replace("torch.", ""), "device": handle.device},
            "settings": settings,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
            "steps": steps,
            "loss_history": history["loss"],
            "eval_history": history["eval"],
            "final_loss": losses[-1] if losses else None,
            "eval_loss": eval_loss,
            "best": best,
            "timings": {"started": started, "seconds": round(seconds, 3),
                        "steps_per_s": round(steps / seconds, 4) if seconds else None,
                        "loss_tokens": trained_tokens,
                        "loss_tokens_per_s": round(lt_s, 2) if lt_s else None},
            "peak_memory": {"kind": mem.kind, "bytes": mem.peak_bytes, "label": mem.label},
            "data": None if data_report is None else {
                "source": data_report.source, "format": data_report.format, "rows": data_report.rows,
                "train_rows": data_report.train_rows, "eval_rows": data_report.eval_rows,
                "trained_examples": data_report.packed_examples or len(train_examples),  # after the drops
                "dropped": {k: getattr(data_report, k) for k in ("dropped_empty", "dropped_no_answer",
                                                                 "dropped_overlong", "dropped_unweighted",
                                                                 "eval_dropped") if getattr(data_report, k, 0)},
                "truncated": data_report.truncated,
                **({"prompt_cut": data_report.prompt_cut} if data_report.prompt_cut else {}),
                "fingerprint": data_report.fingerprint, "length_stats": data_report.stats(),
                **({"spec": data_report.spec} if getattr(data_report, "spec", None) else {}),
            },
            "versions": versions(),
            "resumed": resumed,
        }
        adapter_path = kept = None
        # args.should_save: under several processes (accelerate / torchrun) only the main process writes.
        if steps > 0 and status != "failed" and args.should_save:
            from .adapters import keep_replaced

            flag.saving = True
            try:
                with interrupt_stops(flag, listeners):
                    kept = keep_replaced(target) if status != "completed" and resume_from is None else None
                    adapter_path = str(save_adapter(peft_model, name, target, record))
            except BaseException:
                if kept is not None and not target.exists():  # the save failed: the completed one comes back
                    os.rename(kept, target)
                    kept = None
                raise
            finally:
                flag.saving = False
        result = TrainResult(
            name=name, status=status, adapter_path=adapter_path, steps=steps,
            final_loss=record["final_loss"], first_loss=losses[0] if losses else None, eval_loss=eval_loss,
            seconds=seconds, trainable_params=trainable, total_params=total, loss_tokens_per_s=lt_s,
            peak_memory_bytes=mem.peak_bytes, record=record,
        )
        ckpts.finish(ckpt_dir, status)
        if status in ("interrupted", "stopped"):
            emit(listeners, Message(ckpts.resume_hint(name, adapter_path, ckpt_dir, steps, world, job)))
        if kept is not None:
            emit(listeners, Message(
                f"the completed adapter {name!r} this run replaced is kept in {kept}: %lora_adapters load {kept} "
                f"--name {name}-before brings it back (the next stopped retrain of {name!r} replaces that copy)."))
        emit(listeners, TrainEnd(run_name=name, status=status, steps=steps, final_loss=record["final_loss"],
                                 elapsed_s=seconds, adapter_path=adapter_path, peak_memory=mem, error=error,
                                 extra={"eval_loss": eval_loss, "eval_step": eval_step,
                                        "first_loss": result.first_loss,  # the whole curve's
                                        "resumed_at": record["resumed"]["at"] if resume_from else None,
                                        "objective": cfg.objective}))
    finally:
        sigint.close()
        ckpts.unmark_running(ckpt_dir)
    del trainer
    if caught is not None:
        raise caught
    return result
