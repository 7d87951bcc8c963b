"""Validated settings with help text: the YAML body of ``%%lora_train`` and its ``--kebab-case`` flags.

One dataclass is the single source of truth: the magic's flags, the README reference table and the
run record are all generated from its fields (peft's LoraConfig style). Pure Python, no torch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import FtUsageError, did_you_mean

MAX_STEPS = 10**9  # beyond any run (and within the int64 counters training keeps)
MAX_SEQ_LEN = 1_048_576
TARGET_PRESETS = ("qv", "attention", "mlp", "all-linear")
TRAIN_ON = ("answers", "all")
OBJECTIVES = ("sft", "dpo", "orpo", "ipo", "simpo")
REFERENCE_OBJECTIVES = ("dpo", "ipo")  # measured against the base: one more no-grad forward per step
OBJECTIVE_NAMES = {"sft": "SFT", "dpo": "DPO", "orpo": "ORPO", "ipo": "IPO", "simpo": "SimPO"}  # as papers write them


def objective_name(objective: str) -> str:
    return OBJECTIVE_NAMES.get(objective, objective.upper())


PAIR_ONLY_SETTINGS = ("beta", "simpo_gamma")  # what only a preference objective reads


# beta when the run gives none (beta: 0): the usual value of each objective (SimPO's paper: 2-2.5; the others 0.1)
PAIR_BETA = {"dpo": 0.1, "orpo": 0.1, "ipo": 0.1, "simpo": 2.0}


def rows_per_example(objective: str) -> int:
    """Rows of the batch one example takes: a preference pair (dpo / orpo) is its chosen and its rejected side."""
    return 1 if objective == "sft" else 2
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# transformers' optimizer names (TrainingArguments.optim) a LoRA run would use; "adamw" is its default
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "adafactor", "sgd", "lion_8bit", "lion_32bit", "rmsprop")
DATA_FORMATS = ("auto", "chat", "prompt-completion", "alpaca", "sharegpt", "text")
OVERLONG = ("truncate", "drop", "split", "truncate_prompt")
TXT_MODES = ("auto", "document", "lines", "blocks")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """LoRA and training settings. Every field is a YAML key and a ``--kebab-case`` flag."""

    # LoRA
    r: int = _f(16, "LoRA rank: capacity of the adapter (8-64 covers most tasks).")
    alpha: float = _f(32, "LoRA alpha; the update is scaled by alpha/r (common practice: 2*r).")
    dropout: float = _f(0.0, "Dropout on the LoRA path during training (0: off; on the CPU each dropout costs about 30% of step time and memory, measured).")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale the update by alpha/sqrt(r) instead of alpha/r "
                                 "(helps at large r).")
    use_dora: bool = _f(False, "DoRA: learn a magnitude per output as well as the LoRA direction (PEFT). Costs "
                               "more than LoRA (demo model, 4-bit, CPU: 267 instead of 336 loss tokens/s, peak 1.7 "
                               "instead of 1.4 GB; PEFT's own DoRA: 196, 2.0 GB); generation keeps each layer's "
                               "weight norm until the adapter changes (26 tok/s; PEFT's own: 3.7).")
    target_modules: Union[str, list] = _f(
        "all-linear",
        "Which linear layers get adapters: a preset (qv, attention, mlp, all-linear) or a list of module names.",
    )
    init_from: str = _f(
        "", "Start from a saved adapter's weights instead of a fresh adapter: its name in the adapters folder, or "
        "its folder (e.g. DPO after SFT: init_from: my-sft). Same r and layers; that adapter's folder is left as it "
        "is, and a DPO/IPO reference stays the base model.")
    # optimisation
    learning_rate: float = _f(2e-4, "Peak learning rate (AdamW).")
    batch_size: int = _f(8, "Examples per device per step.")
    grad_accum: int = _f(1, "Gradient accumulation steps (effective batch = batch_size * grad_accum).")
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 means use epochs.")
    warmup: float = _f(0.03, "Warm-up: a fraction of the steps (< 1) or a number of steps (>= 1).")
    lr_scheduler: str = _f("cosine", f"Learning-rate schedule: {', '.join(SCHEDULERS)}.", choices=SCHEDULERS)
    optimizer: str = _f(
        "adamw", "Optimizer, by transformers' name: adamw (torch's fused AdamW), adamw_8bit (bitsandbytes: Adam "
        "states in 8 bits, a quarter of their memory), paged_adamw_8bit (CUDA), adafactor, sgd, ...",
        choices=OPTIMIZERS)
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    neftune_noise_alpha: float = _f(0.0, "NEFTune: noise added to the input embeddings while training (e.g. 5; "
                                         "0: off).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 turns clipping off).")
    seed: int = _f(42, "Random seed for adapter initialisation, data order and the eval split.")
    gradient_checkpointing: Union[bool, str] = _f(
        "auto", "Recompute activations in the backward pass: less memory, ~20-30% slower. auto: on when the "
        "longest batch's activations (estimated as %ft_plan does) would take over half the free memory.",
        tristate=True)
    chunked_loss: bool = _f(
        True, "Compute the loss over the output layer in row chunks, only where tokens carry loss: never holds "
        "full-vocabulary fp32 logits for the batch (faster, much less memory; same loss and gradients).")
    loss_chunk_rows: int = _f(0, "Rows per chunk for chunked_loss (0: auto, 128 rows, 64 with gradient checkpointing, fewer where that would pass 64 MB of fp32 logits).")
    autocast: bool = _f(
        True, "Run the forward under autocast in the compute dtype (bf16 where the hardware is fast at it): LoRA "
        "layers compute in bf16 with fp32 weights instead of keeping fp32 copies of their inputs.")
    lean_activations: bool = _f(
        True, "Llama-style RMSNorm and SwiGLU MLP keep only their 16-bit inputs for the backward (no fp32 norm "
        "copies, no SiLU outputs, and with a fused LoRA `down_proj` no SwiGLU product): about a third less activation "
        "memory, same step time and gradients.")
    fused_lora: bool = _f(
        True, "Each LoRA layer runs as one fused step (base matmul + low-rank update in one addmm, no separate "
        "scaling, clone or sum passes over its output): same gradients, faster on small models.")
    causal_mask_only: bool = _f(
        True, "Right-padded batches run with the causal mask alone: in a causal model the padding mask changes "
        "nothing for the tokens that carry loss, and without it the attention kernels skip the blocks above the "
        "diagonal (on the CPU: ft_magics' own causal attention, 2-3x faster than PyTorch's at a few hundred tokens "
        "per row on the demo model). Same loss; left padding, holes and packed rows keep their mask.")
    padding_free: bool = _f(
        True, "A batch whose rows would be mostly padding (lengths far apart: over 8% pad) runs as one row of its "
        "examples, each attending only to itself, so no layer multiplies padding (CPU attention and flash attention; "
        "SFT). Same examples, same loss; on the demo model's varying-length set 1.15x the loss tokens/s and 0.9x the peak.")
    heap_reuse: bool = _f(
        True, "CPU only: while training, freed heap blocks up to 32 MB are kept for the next step's activations "
        "instead of going back to the OS at once: no page faults for every activation every step (1.4-1.6x "
        "faster at a few hundred tokens per row on the demo model), for a higher RSS peak; false: the lowest peak.")
    lean_steps: bool = _f(
        True, "The training loop's per-step bookkeeping (PEFT's input-casting switch, train(), zero_grad, gradient "
        "clipping, the FLOP count) uses lists of the model's modules and parameters made once, instead of walking "
        "every module on every step: the same steps, less host time (most of a small model's step on a GPU).")
    # objective
    objective: str = _f(
        "sft", "What the adapter learns: sft (imitate the answers), dpo (prefer the chosen answer of each "
        "prompt/chosen/rejected pair over the rejected one, relative to the base model, which is the same model "
        "with the adapter switched off: no second copy) or orpo (learn the chosen answers and, in the same loss, "
        "their odds over the rejected ones; no reference pass), ipo (DPO's comparison with the base, pulled toward a "
        "fixed margin of 1/(2 beta) in mean log-probability per token instead of ever wider) or simpo (the chosen "
        "answers' mean log-probability per token above the rejected ones' by a margin; no reference pass).",
        choices=OBJECTIVES)
    beta: float = _f(0.0, "dpo: how strongly the adapter is held to the base model (higher: closer; 0.1-0.5 is "
                          "usual); orpo: the weight of the odds-ratio term beside the chosen answers' loss; ipo: the "
                          "margin is 1/(2 beta); simpo: the scale of the per-token gap. 0: the objective's usual "
                          "value (simpo 2.0, the others 0.1).")
    simpo_gamma: float = _f(0.5, "simpo: the margin the scaled gap (beta x per-token log-probability gap) must "
                                 "clear (0.5-1.5 is usual).")
    # data
    max_seq_len: int = _f(512, "Longest example in tokens; longer ones are truncated or dropped (see overlong).")
    overlong: str = _f("truncate", "What to do with examples longer than max_seq_len: truncate (cut the end), drop, "
                       "split (text learned whole, as in continued pre-training: consecutive rows of max_seq_len "
                       "tokens, nothing lost), or truncate_prompt (keep the answer whole and cut the middle of the "
                       "prompt: its start and its end stay, for long documents with short answers; an answer too "
                       "long for that is cut at its end).", choices=OVERLONG)
    train_on: str = _f("answers", "Which tokens carry loss: answers (assistant turns / completions) or all.", choices=TRAIN_ON)
    format: str = _f("auto", f"Dataset format: {', '.join(DATA_FORMATS)}.", choices=DATA_FORMATS)
    text_field: Optional[str] = _f(None, "Column holding the text for the text format.")
    map: Optional[str] = _f(None, "Column mapping, e.g. 'q=prompt,reply=completion' (well-known pairs such as "
                            "question/answer or input/output need none).")
    eval_map: Optional[str] = _f(None, "Column mapping for the eval data (--eval) when its columns differ from "
                                 "--data's (default: map where the eval data has map's columns, else none).")
    txt_mode: str = _f(
        "auto", "How a .txt file becomes examples: document (the whole file), lines (one per line), blocks "
        "(separated by blank lines), or auto (blocks if the file has blank lines, else lines).", choices=TXT_MODES)
    max_rows: int = _f(0, "Read only the first N rows of the data, streaming large files (0: all rows; a file "
                          "too large for the free memory is refused).")
    packing: bool = _f(False, "Pack short examples into rows of max_seq_len tokens; attention stays within each "
                              "example (checked on the loaded model, refused where it cannot).")
    group_by_length: bool = _f(True, "Batch examples of similar length together to cut padding waste.")
    # evaluation
    eval_fraction: float = _f(0.0, "Fraction of the data held out for evaluation when no --eval source is given.")
    eval_steps: int = _f(0, "Evaluate every N steps (0: only at the end, when there is eval data).")
    keep_best: bool = _f(False, "Save the adapter as it was at the evaluation with the lowest eval loss, not as the "
                                "last step left it (needs eval data and eval_steps).")
    early_stopping: int = _f(0, "Stop after this many evaluations in a row without a lower eval loss, keeping the "
                                "best adapter (needs eval data and eval_steps; 0: off).")
    # reporting
    log_every: int = _f(1, "Read the loss back from the device every N steps (fewer host syncs).")
    # checkpoints and memory (resume with %%lora_train NAME --resume)
    save_every: int = _f(0, "Save a resumable checkpoint every N steps (0: only by time, see save_every_minutes).")
    save_every_minutes: float = _f(
        5.0, "Also save a resumable checkpoint when this many minutes have passed since the last one (0: off)."
    )
    auto_batch_size: bool = _f(False, "On out-of-memory, retry with a smaller batch_size until one fits.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Optional[dict], base: Optional["TrainConfig"] = None,
                  check: bool = True, dtype: Optional[str] = None, bits: Optional[int] = None) -> "TrainConfig":
        """Merge ``data`` over ``base`` (or the defaults), validating every key and value; ``check=False`` leaves
        the checks across settings (keep_best needs eval_steps) to the merge of what overrides these (flags
        over a cell body: the body alone may lack what a flag gives). ``dtype``: the loaded model's compute dtype
        (``bfloat16``) and ``bits`` its base's, so that another tool's ``bf16: true`` (``load_in_4bit: true``) is
        taken where it asks for what the load chose."""
        cfg = dataclasses.replace(base) if base is not None else cls()
        if not data:
            if check:
                cfg.validate()
            return cfg
        if not isinstance(data, dict):
            raise not_settings(data)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        data = _llama_factory_stage(data)
        seen: dict = {}
        eval_batch = None  # (key, value) of per_device_eval_batch_size, read against the batch_size set here
        foreign: list = []  # other tools' settings and unknown keys: all named at once, not one per try
        unknown = False
        for raw_key, value in data.items():
            key = canonical_key(raw_key)
            if key == "per_device_eval_batch_size":  # read once batch_size is known: equal, it is what happens
                eval_batch = (raw_key, value)
                continue
            if key in OTHER_TOOLS:
                try:
                    translated = _other_tools_setting(key, raw_key, value, dtype, bits)
                except FtUsageError as exc:
                    foreign.append(str(exc))
                    continue
                if translated is None:  # what this tool does anyway (e.g. bias: none)
                    continue
                key, value = translated
            if key not in fields:
                foreign.append(f"unknown setting {raw_key!r}{did_you_mean(key, list(fields) + list(ALIASES))}.")
                unknown = True
                continue
            if key in seen:
                raise FtUsageError(
                    f"{key} is given twice, as {seen[key]!r} and as {raw_key!r} (another name for it); keep one."
                )
            seen[key] = raw_key
            setattr(cfg, key, _coerce(key, fields[key], value))
            if key == "warmup":  # one setting for both: each other tool's name keeps its own meaning
                _check_warmup_alias(str(raw_key).strip().lower().replace("-", "_"), cfg.warmup)
        if eval_batch is not None and _number(eval_batch[1]) != cfg.batch_size:
            foreign.append(f"{eval_batch[0]!r}: {eval_batch[1]!r} is another tool's setting; here write "
                           f"{OTHER_TOOLS['per_device_eval_batch_size']} ({cfg.batch_size} here).")
        if foreign:
            valid = f" Valid settings: {', '.join(fields)}. See %ft_help lora_train." if unknown else ""
            if len(foreign) == 1:
                raise FtUsageError(foreign[0] + valid)
            raise FtUsageError(f"{len(foreign)} settings are not this tool's:\n" + "\n".join(f"  - {m}" for m in foreign)
                               + ("\n" + valid.strip() if valid else ""))
        if check:
            cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise FtUsageError(msg)

        need(self.r >= 1, f"r must be a positive integer (got {self.r}); try 8, 16 or 32.")
        need(self.alpha > 0, f"alpha must be positive (got {self.alpha}); common practice is alpha = 2*r.")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1) (got {self.dropout}).")
        need(0 < self.learning_rate < 1, f"learning_rate must be between 0 and 1 (got {self.learning_rate}); try 2e-4.")
        need(self.batch_size >= 1, f"batch_size must be at least 1 (got {self.batch_size}).")
        need(self.grad_accum >= 1, f"grad_accum must be at least 1 (got {self.grad_accum}).")
        need(self.epochs > 0, f"epochs must be positive (got {self.epochs}).")
        need(self.max_steps == -1 or 1 <= self.max_steps <= MAX_STEPS,
             f"max_steps must be -1 (use epochs) or from 1 to {MAX_STEPS:,} (got {self.max_steps:,}).")
        need(self.warmup >= 0, f"warmup must be >= 0 (got {self.warmup}).")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay}).")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {self.max_grad_norm}).")
        need(16 <= self.max_seq_len <= MAX_SEQ_LEN, f"max_seq_len must be between 16 and {MAX_SEQ_LEN} (got {self.max_seq_len}).")
        need(self.max_rows >= 0, f"max_rows must be >= 0 (got {self.max_rows}); 0 reads every row.")
        need(0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1) (got {self.eval_fraction:g})" + (
            f"; it is a fraction of the rows: {self.eval_fraction / 100:g} holds out {self.eval_fraction:g}%."
            if 1 <= self.eval_fraction < 100 else "."))
        need(self.neftune_noise_alpha >= 0, f"neftune_noise_alpha must be >= 0 (got {self.neftune_noise_alpha}); 0 turns it off.")
        need(self.eval_steps >= 0, f"eval_steps must be >= 0 (got {self.eval_steps}).")
        need(self.early_stopping >= 0, f"early_stopping must be >= 0 evaluations (got {self.early_stopping}); 0 turns it off.")
        need(not (self.keep_best or self.early_stopping) or self.eval_steps > 0,
             f"{'early_stopping' if self.early_stopping else 'keep_best'} compares evaluations made during training: "
             "set eval_steps: N too (and give eval data: --eval FILE or eval_fraction: 0.1).")
        need(self.beta >= 0 and math.isfinite(self.beta),
             f"beta must be positive (got {self.beta}); 0.1 is the usual start (0: the objective's usual value).")
        need(self.simpo_gamma >= 0, f"simpo_gamma must be >= 0 (got {self.simpo_gamma}); 0.5 is the usual start.")
        if self.objective != "sft":
            need(self.overlong != "split", f"overlong: split does not apply to objective: {self.objective} (each "
                                           "pair is compared as a whole); use truncate or drop.")
            need(not self.packing, f"packing: true does not apply to objective: {self.objective} (each pair is "
                                   "compared as a whole); set packing: false.")
            need(self.train_on == "answers", f"train_on: {self.train_on} does not apply to objective: "
                 f"{self.objective}: the pairs are compared on their answers; drop train_on.")
        need(self.log_every >= 1, f"log_every must be >= 1 (got {self.log_every}).")
        need(self.loss_chunk_rows >= 0, f"loss_chunk_rows must be >= 0 (0 = auto; got {self.loss_chunk_rows}).")
        need(self.save_every >= 0, f"save_every must be >= 0 steps (got {self.save_every}); 0 turns it off.")
        need(self.save_every_minutes >= 0,
             f"save_every_minutes must be >= 0 (got {self.save_every_minutes}); 0 turns it off.")
        need(0 <= self.seed <= 2**32 - 1, f"seed must be between 0 and {2**32 - 1} (got {self.seed}).")
        need(self.warmup < 1 or float(self.warmup).is_integer(),
             f"warmup {self.warmup:g} is neither a fraction of the steps (below 1) nor a whole number of steps; "
             f"use e.g. {int(self.warmup)} or 0.1.")
        tm = self.target_modules
        if isinstance(tm, str):
            need(
                tm in TARGET_PRESETS or "," in tm or tm.isidentifier(),
                f"target_modules {tm!r} is not a preset{did_you_mean(tm, TARGET_PRESETS)}: use one of "
                f"{', '.join(TARGET_PRESETS)} or a list of module names such as [q_proj, v_proj].",
            )
        else:
            need(
                isinstance(tm, list) and tm and all(isinstance(m, str) and m for m in tm),
                "target_modules must be a preset name or a non-empty list of module names.",
            )

    @property
    def pair_beta(self) -> float:
        """The beta a preference run uses: the one given, else the objective's usual value."""
        return self.beta or PAIR_BETA.get(self.objective, 0.1)

    @property
    def pairs(self) -> bool:
        """Whether the run trains on preference pairs (each pair is two rows of the batch)."""
        return rows_per_example(self.objective) > 1

    def warmup_kwargs(self) -> dict:
        if self.warmup >= 1:
            return {"warmup_steps": int(self.warmup)}
        return {"warmup_steps": float(self.warmup)}


# Names users bring from transformers / peft / other tools.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "warmup_steps": "warmup",
    "warmup_ratio": "warmup",
    "lr_scheduler_type": "lr_scheduler",
    "optim": "optimizer",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "load_best_model_at_end": "keep_best",
    "early_stopping_patience": "early_stopping",
    "dataset_text_field": "text_field",
    "num_epochs": "epochs",
    "dpo_beta": "beta",
    "orpo_beta": "beta",
    "pref_beta": "beta",
    "orpo_lambda": "beta",
    "training_objective": "objective",
    "stage": "objective",
    "random_state": "seed",
}

_DTYPE = ("%qlora_load --dtype bf16 (or fp16, fp32): the compute dtype is chosen when the model is loaded (auto: "
          "bf16 where the hardware is fast at it), and training follows it (autocast)")
_ADAM = ("nothing: AdamW runs with transformers' defaults here (adam_beta1 0.9, adam_beta2 0.999, adam_epsilon "
         "1e-8); learning_rate, weight_decay and max_grad_norm are the optimizer's settings")
_ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}
_BITS_OF = {"load_in_4bit": 4, "load_in_8bit": 8}  # what each of transformers' switches asks of the base's bits
# transformers' precision switches: what each asks of the compute dtype (``tf32`` is CUDA's fp32 matmul mode)
_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "bf16_full_eval": "bfloat16", "fp16_full_eval": "float16"}
_BITS = "%qlora_load --bits 4 (NF4 with double quantisation; 8, 16, 32 otherwise): the base's bits are chosen at the load"
# settings of other tools (TRL, transformers, PEFT) that say the same thing another way: what to write here
OTHER_TOOLS = {
    "completion_only_loss": "train_on: answers (the default: loss on the answers only) or train_on: all",
    "assistant_only_loss": "train_on: answers (the default: loss on the assistant turns only) or train_on: all",
    "eval_strategy": "eval_steps: N (evaluate every N steps; 0, the default, evaluates at the end)",
    "save_strategy": "save_every: N (steps) or save_every_minutes: M",
    "bias": "nothing: adapters are trained without bias terms (PEFT's bias='none')",
    "lora_bias": "nothing: adapters are trained without bias terms (PEFT's bias='none')",
    "lora_target": "target_modules: all-linear (LLaMA-Factory's 'all') or a list such as [q_proj, v_proj]",
    "pref_loss": "objective: dpo, ipo, orpo or simpo (LLaMA-Factory's sigmoid is dpo)",
    "loss_type": "objective: dpo, ipo, orpo or simpo (TRL's loss_type sigmoid is dpo; nll is sft); TRL's other "
                 "losses (hinge, robust, ...) have no counterpart here",
    "evaluation_strategy": "eval_steps: N (evaluate every N steps; 0, the default, evaluates at the end)",
    "bf16": _DTYPE, "fp16": _DTYPE, "tf32": _DTYPE, "bf16_full_eval": _DTYPE, "fp16_full_eval": _DTYPE,
    "adam_beta1": _ADAM, "adam_beta2": _ADAM, "adam_epsilon": _ADAM,
    "per_device_eval_batch_size": "nothing: evaluation runs in batches of batch_size (per_device_train_batch_size)",
    "lr_scheduler_kwargs": "lr_scheduler: cosine, linear, constant, ... with warmup: the schedules here take no "
                           "other arguments",
    "load_in_4bit": _BITS, "load_in_8bit": _BITS, "bnb_4bit_quant_type": _BITS, "bnb_4bit_compute_dtype": _BITS,
    "bnb_4bit_use_double_quant": _BITS,
    "output_dir": "the --output-dir DIR flag of %%lora_train (the adapter is saved in DIR/NAME; by default in "
                  "adapters/NAME)",
    "report_to": "nothing: the run is logged to the live dashboard and to the adapter's ft_run.json (no trackers)",
    "task_type": "nothing: adapters are trained for causal language modelling (PEFT's CAUSAL_LM)",
    "save_total_limit": "nothing: a run keeps its newest checkpoints only while it runs, and removes them when it "
                        "completes",
    "dataset_num_proc": "nothing: the data is tokenised once in this process and cached",
    "use_gradient_checkpointing": "gradient_checkpointing: true, false or auto",
    "max_prompt_length": "nothing: max_seq_len bounds prompt and answer together, and overlong: truncate_prompt "
                         "shortens the prompts of longer rows, keeping the answers (by default a prompt that "
                         "leaves no room for its answer is dropped and counted)",
    "max_completion_length": "nothing: max_seq_len bounds prompt and answer together (overlong: decides what "
                             "happens to longer rows)",
    "ref_model": "nothing: a preference objective's reference is the base model itself (the adapter switched off, "
                 "no second copy)",
    "rpo_alpha": "objective: orpo, which learns the chosen answers beside the preference (TRL's RPO, DPO plus the "
                 "chosen answers' NLL, has no exact counterpart)",
}
# LLaMA-Factory: stage picks the kind of training, pref_loss the preference loss within stage: dpo
_PREF_LOSS = {"sigmoid": "dpo", "dpo": "dpo", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}
# TRL: DPOConfig's loss_type (sigmoid, ipo, ...), CPOConfig's (simpo), SFTConfig's (nll: the plain SFT loss)
_LOSS_TYPE = {**_PREF_LOSS, "nll": "sft"}
_STAGES = {"sft": "sft", "pt": "sft", "dpo": "dpo", "orpo": "orpo", "simpo": "simpo", "ipo": "ipo"}  # pt: plain text
# is trained on every token under sft
_ANSWERS_ONLY = ("completion_only_loss", "assistant_only_loss")


def _llama_factory_stage(data: dict) -> dict:
    """LLaMA-Factory's ``stage``: ``dpo`` beside a ``pref_loss`` is that loss's objective (the pair is one setting
    here); a stage with no counterpart (pt, rm, ppo, kto) is named as such, not as an unknown objective."""
    stage = next((k for k in data if str(k).strip().lower() == "stage"), None)
    if stage is None:
        return data
    value = str(data[stage]).strip().lower()
    if value == "dpo" and any(str(k).strip().lower() == "pref_loss" for k in data):
        return {k: v for k, v in data.items() if k != stage}
    if value not in _STAGES:
        what = {"rm": "reward modelling", "ppo": "PPO", "kto": "KTO"}.get(value, "that stage")
        raise FtUsageError(f"stage: {data[stage]} (LLaMA-Factory's) has no counterpart here: {what} is not trained "
                           f"here. The objectives here: {', '.join(sorted(set(_STAGES.values())))}.")
    return {k: (_STAGES[value] if k == stage else v) for k, v in data.items()}


def _check_warmup_alias(name: str, value: float) -> None:
    """``warmup`` is a fraction of the steps below 1 and a number of steps from 1; transformers' names say which
    they mean, and a value outside it would be read as the other (warmup_ratio: 1.0 as one step)."""
    if name == "warmup_ratio" and not 0 <= value < 1:
        raise FtUsageError(f"warmup_ratio is a fraction of the steps below 1 (got {value:g}): a warm-up over the whole "
                           "run never reaches the learning rate. Use e.g. warmup_ratio: 0.1, or warmup_steps: N.")
    if name == "warmup_steps" and not float(value).is_integer():
        raise FtUsageError(f"warmup_steps is a number of steps (got {value:g}); for a fraction of the steps write "
                           f"warmup_ratio: {value:g}.")


def _number(value) -> Optional[float]:
    """``value`` as a number (YAML reads ``1e-8`` as text), or None; true/false are no numbers."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _switch(value) -> Optional[bool]:
    """A YAML true/false (or its text), else None."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _other_tools_setting(key: str, raw_key: str, value, dtype: Optional[str] = None, bits: Optional[int] = None):
    """``(setting, value)`` for another tool's setting that has a clean translation, None for one that asks
    for what happens anyway, else a usage error saying what to write here. ``dtype``: the loaded model's compute
    dtype (``bfloat16``), against which ``bf16``, ``fp16`` and ``tf32`` are read; ``bits``: its base's bits, against
    which ``load_in_4bit`` and ``load_in_8bit`` are."""
    on = _switch(value)
    if key in _PRECISION and dtype and on is not None:
        if on == (dtype == _PRECISION[key]):  # bf16: true on a bf16 model (false on another): what happens anyway
            return None
        short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
        want = short[_PRECISION[key]] if on else " or ".join(v for k, v in short.items() if k not in (dtype, _PRECISION[key]))
        raise FtUsageError(f"{raw_key}: {value} asks for {'' if on else 'other than '}{_PRECISION[key]} compute, but the "
                           f"model was loaded to compute in {dtype}: the compute dtype is chosen at the load. Reload "
                           f"with %qlora_load --dtype {want}, or drop {raw_key} to train in {dtype}.")
    if key == "tf32" and dtype and on is not None:
        if dtype != "float32" or not on:  # no fp32 products to make TensorFloat-32
            return None
        raise FtUsageError(f"{raw_key!r}: {value!r} makes CUDA's fp32 matrix products TensorFloat-32, which ft_magics "
                           f"does not switch; the model computes in float32 as loaded. For faster products load it "
                           "with %qlora_load --dtype bf16, or drop tf32.")
    if key == "lr_scheduler_kwargs" and not value:  # {}: no arguments asked for
        return None
    if key in _ADAM_DEFAULTS and _number(value) is not None and math.isclose(_number(value), _ADAM_DEFAULTS[key],
                                                                              rel_tol=1e-9):
        return None  # (YAML reads 1e-8 as text: the number it spells)
    if key in _BITS_OF and bits and on is not None:
        if on == (bits == _BITS_OF[key]):  # load_in_4bit: true on a 4-bit load: what happens anyway
            return None
        other = f"--bits {_BITS_OF[key]}" if on else " or ".join(f"--bits {b}" for b in (16, 8, 4, 32)
                                                                  if b not in (bits, _BITS_OF[key]))
        raise FtUsageError(f"{raw_key}: {value} asks for {'' if on else 'other than '}a {_BITS_OF[key]}-bit base, but the "
                           f"model was loaded in {bits}-bit: the base's bits are chosen at the load. Reload with "
                           f"%qlora_load {other}, or drop {raw_key}.")
    if key in _ANSWERS_ONLY and isinstance(value, bool):
        return "train_on", "answers" if value else "all"
    if key in ("bias", "lora_bias") and value in ("none", False, None):
        return None
    if key == "lora_target" and isinstance(value, str) and value.strip():
        return "target_modules", "all-linear" if value.strip() == "all" else value
    if key == "pref_loss" and str(value).strip().lower() in _PREF_LOSS:
        return "objective", _PREF_LOSS[str(value).strip().lower()]
    if key == "loss_type" and str(value).strip().lower() in _LOSS_TYPE:
        return "objective", _LOSS_TYPE[str(value).strip().lower()]
    text = str(value).strip().lower() if isinstance(value, str) else value
    if key == "report_to" and text in ("none", None, [], False):
        return None
    if key == "task_type" and text == "causal_lm":
        return None
    if key == "use_gradient_checkpointing" and (isinstance(value, bool) or text in ("unsloth", "true", "false")):
        return "gradient_checkpointing", text not in (False, "false")  # Unsloth's "unsloth": on (its own offload)
    if key == "save_strategy" and text == "no":
        return "save_every_minutes", 0
    raise FtUsageError(f"{raw_key!r}: {value!r} is another tool's setting; here write {OTHER_TOOLS[key]}.")


# where the data comes from may also be written in the body (flags on the line win, as for settings)
DATA_KEYS = {"data": "data", "dataset": "data", "train_data": "data", "train_file": "data",
             "eval": "eval", "eval_data": "eval", "eval_dataset": "eval", "eval_file": "eval"}


def pop_data_keys(body: dict) -> dict:
    """Take ``data:`` / ``eval:`` (and their usual other names) out of a cell body: ``{"data": .., "eval": ..}``."""
    found: dict = {}
    for raw in [k for k in body if str(k).replace("-", "_") in DATA_KEYS]:
        which = DATA_KEYS[str(raw).replace("-", "_")]
        if which in found:
            raise FtUsageError(f"the {which} source is given twice in the cell body ({raw!r} and another name); keep one.")
        value = body.pop(raw)
        if value is None or isinstance(value, (list, dict)):  # 'data:' left empty, or YAML's list / mapping forms
            got = "nothing" if value is None else f"a {'list' if isinstance(value, list) else 'mapping'} ({value!r:.60})"
            raise FtUsageError(
                f"{raw}: in the cell body names one {which} source, and got {got}: write a file, a folder, a glob "
                f"pattern (several files: data/*.jsonl), demo:NAME or a notebook variable's name, e.g. "
                f"'{raw}: data/train.jsonl'.")
        found[which] = str(value)
    return found


def other_tool_pointer(name) -> Optional[str]:
    """What to write here for another tool's setting ``name`` (``bf16``, ``--load-in-4bit``), or None."""
    return OTHER_TOOLS.get(canonical_key(str(name).strip().lower()))


def canonical_key(raw_key) -> str:
    """The setting a YAML key or flag name means: ``learning-rate``, ``lr`` -> ``learning_rate``."""
    key = str(raw_key).replace("-", "_")
    return ALIASES.get(key, key)


def overridden_notes(given: set, cfg: "TrainConfig") -> list:
    """Notes for settings given together where one makes the other moot (``given``: canonical keys)."""
    notes = []
    if {"max_steps", "epochs"} <= given and cfg.max_steps > 0:
        notes.append(f"max_steps {cfg.max_steps} and epochs {cfg.epochs:g} are both set: training stops after "
                     f"max_steps; epochs is ignored (max_steps: -1 goes by epochs).")
    if "simpo_gamma" in given and cfg.pairs and cfg.objective != "simpo":  # (under sft: core.training.run_notes)
        notes.append(f"simpo_gamma is SimPO's target margin: objective: {cfg.objective} does not use it "
                     "(objective: simpo does).")
    return notes


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or explain what was expected."""
    default = f.default
    if f.type in (float, "float") and isinstance(default, int) and not isinstance(default, bool):
        default = float(default)  # alpha: float = 32 takes 16.5; its default is written as a whole number
    choices = f.metadata.get("choices")
    try:
        if key in ("map", "eval_map") and isinstance(value, dict):  # YAML's own mapping form: {question: prompt, answer: completion}
            return ",".join(f"{k}={v}" for k, v in value.items())
        if key == "target_modules":
            if isinstance(value, str):
                value = value.strip()
                if value.startswith("["):
                    value = [v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip()]
                elif "," in value:
                    value = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (list, tuple)):
                value = [str(v) for v in value]
            else:
                raise TypeError
            return value
        if f.metadata.get("tristate") and str(value).strip().lower() == "auto":
            return "auto"
        if isinstance(default, bool) or f.metadata.get("tristate"):
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise TypeError
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise FtUsageError(f"{key} must be a finite whole number, got {value!r}.")
                if not value.is_integer():
                    raise TypeError
                return int(value)
            if isinstance(value, int):
                return value
            with contextlib.suppress(ValueError):  # '12345678901234567890' stays exact (float() rounds it)
                return int(str(value).strip())
            fv = float(str(value).strip())
            if not math.isfinite(fv):
                raise FtUsageError(f"{key} must be a finite whole number, got {value!r}.")
            if not fv.is_integer():
                raise TypeError
            return int(fv)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            fv = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
            if not math.isfinite(fv):
                raise FtUsageError(f"{key} must be a finite number, got {value!r}.")
            return fv
        # strings (and Optional[str])
        if value is None:
            return None
        if isinstance(value, (dict, list)):
            raise TypeError
        s = str(value).strip()
        if choices and s not in choices:
            raise FtUsageError(
                f"{key} {s!r} is not one of {', '.join(choices)}{did_you_mean(s, choices)}."
            )
        return s
    except FtUsageError:  # a choice check above already said what is wrong (FtUsageError is a ValueError)
        raise
    except (TypeError, ValueError, OverflowError):
        kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(type(default), "a string")
        if f.metadata.get("tristate"):
            kind = "true, false or auto"
        if key == "target_modules":
            kind = "a preset name or a list of module names"
        pct = str(value).strip()
        hint = ""
        if kind == "a number" and pct.endswith("%") and pct[:-1].strip().replace(".", "", 1).isdigit():
            hint = f" (a percentage is written as a fraction here: {float(pct[:-1]) / 100:g} for {pct})"
        raise FtUsageError(f"{key} must be {kind}, got {value!r}{hint}.") from None


@functools.cache
def _strict_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (not the last one silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):  # '[a, b]: 1' or '? {a: 1}': a key must be a word
                    raise yaml.constructor.ConstructorError(
                        None, None, f"a key at line {key_node.start_mark.line + 1} is a "
                        f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}; a key is one word "
                        f"before the colon, e.g. 'r: 16'", key_node.start_mark)
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def parse_yaml_body(text: str) -> dict:
    """Parse a cell body as YAML into a dict; a syntax error names the line."""
    import yaml

    text = text or ""
    if not text.strip():
        return {}
    for n, line in enumerate(text.splitlines(), 1):  # 'r:8' is one word to YAML; the error fell on another line
        m = _KEY_COLON_NO_SPACE.match(line)
        if m:
            raise FtUsageError(f"line {n} of the cell body, {line.strip()!r}, has no space after its colon, so YAML "
                               f"reads it as one word: write '{m.group(1)}: {m.group(2)}'.")
    try:
        data = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark is not None:
            problem += f" ({context} that starts at line {cmark.line + 1})"
        raise FtUsageError(
            f"the cell body is not valid YAML{where}: {problem}. Write one 'key: value' per line, e.g. 'r: 16'."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise not_settings(data, text)
    return data


_KEY_EQUALS = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*=\s*(.*?)\s*$")
# a setting written 'r:8': a known key's name, a colon and a value with no space between (a URL or a time such as
# 'data: http://x' or '12:30' has its space after the key's colon, or no key name before it)
_KEY_COLON_NO_SPACE = re.compile(r"^([A-Za-z_][\w-]*):([^\s:/#][^#]*?)\s*(#.*)?$")  # (top level: unindented)


def not_settings(data, text: str = "") -> FtUsageError:
    """The error for a body (or a settings object) that is not a mapping of settings: names what it is
    and, for ``key=value`` lines, the 'key: value' spelling that works."""
    what = {str: "plain text", list: "a list"}.get(type(data), f"a {type(data).__name__}")
    first = next((line for line in (text or "").splitlines() if line.strip()), "")
    m = _KEY_EQUALS.match(first)
    hint = (f" '{first.strip()}' is written with '='; write '{m.group(1)}: {m.group(2)}'." if m
            else " Example:\nr: 16\nalpha: 32\nlearning_rate: 2e-4")
    return FtUsageError(f"the cell body must be YAML 'key: value' lines, one setting per line, not {what}.{hint}")


def reference_table() -> str:
    """Markdown table of every setting with its default and help (README is checked against it)."""
    rows = ["| key / flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        rows.append(f"| `{f.name}` / `{flag}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
