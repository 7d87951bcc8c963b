"""Memory planner: how much memory full fine-tuning, LoRA and QLoRA need for a model, before loading it.

Pure Python (no torch): works from a model's config.json, a built-in table of common models, or a bare
parameter count such as ``7B``. Every figure is an *estimate* from the formulas below; the benchmark
(benchmarks/bench_planner.py) checks them against measured peaks on the demo model.

Per parameter P of the base model (bytes):
  full fine-tuning, mixed precision + AdamW: 2 (bf16 weights) + 2 (bf16 grads) + 4 (fp32 master copy)
                                             + 8 (fp32 Adam m and v) = 16
  LoRA on a 16-bit base:                     2 (frozen weights)
  QLoRA, NF4 + double quantisation:          0.5 (4-bit codes) + 1/64 (an 8-bit absmax per 64-block)
                                             + 4/(64*256) (fp32 second-level constant per 256 blocks)
                                             = 4.127 bits; embeddings and the output head stay 16-bit
Adapter (A parameters, r * (in + out) per adapted linear layer): 4 (fp32 weights) + 4 (grads) + 8 (Adam) = 16.
With an 8-bit optimizer (optimizer: adamw_8bit) Adam's two states take 2 bytes instead of 8: 10 per adapter
parameter, and 10 per parameter for full fine-tuning; Lion keeps one momentum (4 B, 1 in 8 bits), RMSprop a
square average (4), SGD without momentum and Adafactor (factored) about nothing (OPTIMIZER_STATES).
Activations kept for the backward pass, per token and layer of a Llama-style block with a fused/SDPA
attention (no L x L scores): 2 * (6h + 2kv + 4i) bytes of 16-bit tensors + 8h bytes of fp32 RMSNorm copies,
plus, for LoRA with dropout, 3 * (6h + i) bytes (dropout masks and dropped inputs of the adapted layers);
h = hidden size, kv = key/value width, i = MLP width (see layer_activation_bytes). With gradient
checkpointing: 2h bytes per layer plus one layer's full set.
Logits: the standard loss keeps s * b * V * (2 + 4 + 4) bytes (16-bit logits, fp32 copy, fp32 gradient);
ft_magics' chunked loss keeps one chunk (128 rows of fp32 logits, at most 64 MB, with their 16-bit copy:
core.speed.auto_chunk_rows).
Mixture of experts (Mixtral, Qwen-MoE, OLMoE, DeepSeek): every expert is held in memory, so the parameter count,
the weights and the all-linear adapter (PEFT adapts each expert) count all of them; activations count the experts
a token is routed to (num_experts_per_tok) and any shared experts (ModelDims.experts_text says what was assumed).
Runtime overhead: about 0.5 GB (CUDA context, or the CPU process's libraries); measured, not derived.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from ..errors import FtUsageError, did_you_mean
from ..paths import user_path
from .speed import auto_chunk_rows, chunk_bytes

GB = 1e9  # decimal gigabytes, as in model cards and the "70B needs ~140 GB" rule of thumb
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
LOGIT_BYTES_STANDARD = 2 + 4 + 4
OVERHEAD_BYTES = 0.5 * GB
ADAPTER_BYTES = 16
FULL_BYTES = 16
ADAM_STATE_BYTES = 8  # fp32 Adam m and v
# (bytes of state per trained parameter, what they are) for the optimizers the `optimizer` setting takes
# (transformers' names and defaults: its sgd and rmsprop keep no momentum; adafactor factors its second moment)
OPTIMIZER_STATES = {
    "adamw": (8, "fp32 Adam m,v"),
    "8bit": (2, "8-bit Adam m,v"),
    "lion_32bit": (4, "fp32 Lion momentum"),
    "lion_8bit": (1, "8-bit Lion momentum"),
    "rmsprop": (4, "fp32 RMSprop square average"),
    "sgd": (0, "SGD: no state"),
    "adafactor": (0, "Adafactor: a row and a column vector per matrix, ~0"),
}


def optimizer_states(optimizer: str = "adamw") -> tuple:
    """``(bytes per trained parameter, description)`` of ``optimizer``'s states; AdamW's for names not listed."""
    name = str(optimizer).lower()
    if name in OPTIMIZER_STATES:
        return OPTIMIZER_STATES[name]
    if "8bit" in name:  # adamw_8bit, adamw_bnb_8bit, paged_adamw_8bit
        return OPTIMIZER_STATES["8bit"]
    return OPTIMIZER_STATES["adamw"]


def optimizer_saving(optimizer: str = "adamw") -> int:
    """Bytes per trained parameter an optimizer saves against fp32 AdamW."""
    return ADAM_STATE_BYTES - optimizer_states(optimizer)[0]


def adapter_bytes(optimizer: str = "adamw") -> int:
    """Bytes per adapter parameter: fp32 weight and gradient plus the optimizer's states."""
    return ADAPTER_BYTES - optimizer_saving(optimizer)


@dataclass
class ModelDims:
    name: str
    params: float  # total parameter count
    layers: int
    hidden: int
    intermediate: int  # MLP width of a dense layer
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    source: str = "config"  # config | table | estimated from a parameter count
    attention_head_dim: Optional[int] = None  # where it is not hidden / heads (Gemma, Qwen3)
    # mixture of experts (0 experts: a dense model): in each of ``moe_layers`` layers the MLP is ``experts``
    # routed experts of width ``expert_intermediate`` (all held in memory, ``experts_per_token`` of them run
    # for a token) behind a router, plus shared experts of total width ``shared_intermediate`` that every
    # token runs (DeepSeek, Qwen-MoE); the other layers have a dense MLP of width ``intermediate``
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    moe_layers: int = 0
    shared_expert_gate: bool = False  # Qwen-MoE's Linear(h, 1) that scales the shared expert
    experts_per_token_source: str = ""  # the config key it came from, or what was assumed and why

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden // max(self.heads, 1)

    @property
    def q_width(self) -> int:
        """Width of the query projection's output (= the output projection's input)."""
        return self.heads * self.head_dim

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def attention_linear_params(self) -> int:
        """q, k, v and o of one layer."""
        return 2 * self.hidden * self.q_width + 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def moe_mlp_params(self) -> int:
        """One mixture-of-experts layer's MLP: every routed expert (gate, up, down), the shared experts, the router."""
        h = self.hidden
        return (3 * h * (self.experts * self.expert_intermediate + self.shared_intermediate) + h * self.experts
                + (h if self.shared_expert_gate else 0))

    @property
    def body_linear_params(self) -> int:
        return (self.layers * self.attention_linear_params + self.dense_layers * 3 * self.hidden * self.intermediate
                + self.moe_layers * self.moe_mlp_params)

    def mlp_active(self, moe: bool) -> tuple:
        """``(MLPs a token runs, their total width)`` in a dense (``moe=False``) or a mixture-of-experts layer."""
        if not moe:
            return 1, self.intermediate
        shared = 1 if self.shared_intermediate else 0
        return (self.experts_per_token + shared,
                self.experts_per_token * self.expert_intermediate + self.shared_intermediate)

    def lora_params(self, r: int = 16) -> int:
        """Adapter parameters for r on all linear layers (q, k, v, o, gate, up, down). In a mixture-of-experts
        layer all-linear adapts every expert, as PEFT does with transformers' fused expert weights (gate_up_proj
        at rank 2r, down_proj at r: r * (3h + 5 * width) per expert), the router and the shared experts."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        attention = r * ((h + self.q_width) * 2 + (h + kv) * 2)
        dense = r * (h + i) * 3
        moe = (self.experts * r * (3 * h + 5 * self.expert_intermediate) + r * (h + self.experts)
               + (r * (h + self.shared_intermediate) * 3 if self.shared_intermediate else 0)
               + (r * (h + 1) if self.shared_expert_gate else 0))
        return self.layers * attention + self.dense_layers * dense + self.moe_layers * moe

    def experts_text(self) -> str:
        """What the plan assumed of a mixture-of-experts model (empty for a dense one)."""
        if not self.moe_layers:
            return ""
        shared = (f", plus shared experts of width {self.shared_intermediate} that every token runs"
                  if self.shared_intermediate else "")
        dense = f"; {self.dense_layers} dense layers (MLP width {self.intermediate})" if self.dense_layers else ""
        return (f"Mixture of experts: {self.experts} experts of width {self.expert_intermediate} in each of "
                f"{self.moe_layers} layers{dense}. Weights, and the all-linear adapter, count all {self.experts} "
                f"(every expert is held in memory and adapted); activations count the {self.experts_per_token} "
                f"routed to each token{' (' + self.experts_per_token_source + ')' if self.experts_per_token_source else ''}"
                f"{shared}.")

    def as_dict(self) -> dict:
        return {"hidden": self.hidden, "layers": self.layers, "vocab": self.vocab,
                "body_linear_params": self.body_linear_params}


# name: (params, layers, hidden, intermediate, heads, kv_heads, vocab, tied[, head_dim where not hidden / heads])
KNOWN_MODELS = {
    "HuggingFaceTB/SmolLM2-135M": (134.5e6, 30, 576, 1536, 9, 3, 49152, True),
    "HuggingFaceTB/SmolLM2-360M": (361.8e6, 32, 960, 2560, 15, 5, 49152, True),
    "HuggingFaceTB/SmolLM2-1.7B": (1.71e9, 24, 2048, 8192, 32, 32, 49152, True),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": (1.10e9, 22, 2048, 5632, 32, 4, 32000, False),
    "Qwen/Qwen2.5-0.5B": (494e6, 24, 896, 4864, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B": (1.54e9, 28, 1536, 8960, 12, 2, 151936, True),
    "Qwen/Qwen2.5-7B": (7.62e9, 28, 3584, 18944, 28, 4, 152064, False),
    "meta-llama/Llama-2-7b-hf": (6.74e9, 32, 4096, 11008, 32, 32, 32000, False),
    "meta-llama/Llama-2-13b-hf": (13.0e9, 40, 5120, 13824, 40, 40, 32000, False),
    "meta-llama/Llama-2-70b-hf": (69.0e9, 80, 8192, 28672, 64, 8, 32000, False),
    "meta-llama/Meta-Llama-3-8B": (8.03e9, 32, 4096, 14336, 32, 8, 128256, False),
    "meta-llama/Meta-Llama-3-70B": (70.6e9, 80, 8192, 28672, 64, 8, 128256, False),
    "mistralai/Mistral-7B-v0.1": (7.24e9, 32, 4096, 14336, 32, 8, 32000, False),
    "mistralai/Mistral-7B-v0.3": (7.25e9, 32, 4096, 14336, 32, 8, 32768, False),
    "meta-llama/Llama-3.1-8B": (8.03e9, 32, 4096, 14336, 32, 8, 128256, False),
    "meta-llama/Llama-3.1-70B": (70.6e9, 80, 8192, 28672, 64, 8, 128256, False),
    "meta-llama/Llama-3.3-70B": (70.6e9, 80, 8192, 28672, 64, 8, 128256, False),
    "meta-llama/Llama-3.2-1B": (1.24e9, 16, 2048, 8192, 32, 8, 128256, True),
    "meta-llama/Llama-3.2-3B": (3.21e9, 28, 3072, 8192, 24, 8, 128256, True),
    "Qwen/Qwen2.5-3B": (3.09e9, 36, 2048, 11008, 16, 2, 151936, True),
    "Qwen/Qwen2.5-14B": (14.7e9, 48, 5120, 13824, 40, 8, 152064, False),
    "Qwen/Qwen2.5-32B": (32.8e9, 64, 5120, 27648, 40, 8, 152064, False),
    "Qwen/Qwen2.5-72B": (72.7e9, 80, 8192, 29568, 64, 8, 152064, False),
    "Qwen/Qwen3-0.6B": (0.596e9, 28, 1024, 3072, 16, 8, 151936, True, 128),
    "Qwen/Qwen3-4B": (4.02e9, 36, 2560, 9728, 32, 8, 151936, True, 128),
    "Qwen/Qwen3-8B": (8.19e9, 36, 4096, 12288, 32, 8, 151936, False, 128),
    "Qwen/Qwen3-14B": (14.8e9, 40, 5120, 17408, 40, 8, 151936, False, 128),
    "google/gemma-2-2b": (2.61e9, 26, 2304, 9216, 8, 4, 256000, True, 256),
    "google/gemma-2-9b": (9.24e9, 42, 3584, 14336, 16, 8, 256000, True, 256),
    "microsoft/Phi-3-mini-4k-instruct": (3.82e9, 32, 3072, 8192, 32, 32, 32064, False),
}
_ALIASES = {"demo": "HuggingFaceTB/SmolLM2-135M"}


def _known(name: str) -> Optional[str]:
    key = _ALIASES.get(name.lower(), name)
    low = {k.lower(): k for k in KNOWN_MODELS}
    short = {k.split("/")[-1].lower(): k for k in KNOWN_MODELS}
    k = key.lower().removesuffix("-instruct").removesuffix("-chat-hf").removesuffix("-hf").removesuffix("-it")
    for cand in (key.lower(), k, k + "-hf", k + "-instruct"):
        if cand in low:
            return low[cand]
        if cand in short:
            return short[cand]
        if cand.split("/")[-1] in short:
            return short[cand.split("/")[-1]]
    return None


# config keys, first found wins: routed experts per MoE layer (Mixtral, Qwen-MoE / OLMoE, DeepSeek, others),
# experts run per token, and an expert's MLP width where it is not intermediate_size
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_topk")
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "expert_intermediate_size")
_REQUIRED = {"hidden size": ("hidden_size", "n_embd", "d_model"),
             "layer count": ("num_hidden_layers", "n_layer", "num_layers"),
             "vocabulary size": ("vocab_size",)}


def dims_from_config(cfg: dict, name: str = "model", where: str = "") -> ModelDims:
    """Dimensions from a transformers config dict (Llama-style names, with common alternatives), dense or
    mixture of experts. ``where`` (the config's file) names it in the error for a config the planner cannot read."""
    where = where or f"{name}'s config"
    fix = "Fix the file, or plan from a parameter count instead (e.g. %ft_plan 7B)."
    if not isinstance(cfg, dict):
        raise FtUsageError(f"{where} is not a JSON object of config keys. {fix}")
    missing = [f"{what} ({' / '.join(keys)})" for what, keys in _REQUIRED.items()
               if all(cfg.get(k) is None for k in keys)]
    if missing:
        raise FtUsageError(f"{where} has no {', '.join(missing)}: the planner needs them to size the model. {fix}")
    g = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)  # noqa: E731
    try:
        hidden = int(g("hidden_size", "n_embd", "d_model"))
        layers = int(g("num_hidden_layers", "n_layer", "num_layers"))
        heads = int(g("num_attention_heads", "n_head", default=max(hidden // 128, 1)))
        kv = int(g("num_key_value_heads", default=heads))
        inter = int(g("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
        vocab = int(g("vocab_size"))
        head_dim = g("head_dim")
        head_dim = int(head_dim) if head_dim and int(head_dim) != hidden // max(heads, 1) else None
        experts = int(g(*EXPERT_KEYS, default=0))
        moe = _moe_from_config(cfg, g, layers, inter) if experts > 1 else {}
    except (TypeError, ValueError) as exc:
        raise FtUsageError(f"{where} has a size that is not a whole number ({exc}). {fix}") from None
    tied = bool(cfg.get("tie_word_embeddings", False))
    d = ModelDims(name, 0, layers, hidden, inter, heads, kv, vocab, tied, "config", head_dim, **moe)
    d.params = d.body_linear_params + d.embed_params + layers * 2 * hidden + hidden
    return d


def _moe_from_config(cfg: dict, g, layers: int, inter: int) -> dict:
    """ModelDims' mixture-of-experts fields from a config that names more than one expert."""
    experts = int(g(*EXPERT_KEYS))
    key = next((k for k in EXPERTS_PER_TOKEN_KEYS if cfg.get(k) is not None), None)
    per_token = int(cfg[key]) if key else 2
    source = key or f"assumed: the config has none of {', '.join(EXPERTS_PER_TOKEN_KEYS)}"
    width = int(g(*EXPERT_WIDTH_KEYS, default=inter))
    # shared experts: Qwen-MoE gives their width, DeepSeek their count (each as wide as a routed expert)
    shared = int(g("shared_expert_intermediate_size", default=0)) or int(g("n_shared_experts", default=0)) * width
    # dense layers among them: DeepSeek's first_k_dense_replace and moe_layer_freq, Qwen-MoE's mlp_only_layers
    # and decoder_sparse_step (transformers' own rules for which layer gets experts)
    first_dense, freq = int(g("first_k_dense_replace", default=0)), max(int(g("moe_layer_freq", default=1)), 1)
    step, only_mlp = max(int(g("decoder_sparse_step", default=1)), 1), set(g("mlp_only_layers", default=()) or ())
    moe_layers = sum(1 for i in range(layers)
                     if i >= first_dense and i % freq == 0 and (i + 1) % step == 0 and i not in only_mlp)
    return dict(experts=experts, experts_per_token=min(per_token, experts),
                expert_intermediate=width, shared_intermediate=shared, moe_layers=moe_layers,
                shared_expert_gate="shared_expert_intermediate_size" in cfg and shared > 0,
                experts_per_token_source=source)


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT])?\s*$")


def dims_from_count(params: float, name: str) -> ModelDims:
    """A Llama-shaped model of ``params`` parameters, embeddings included: a 32,000-token vocabulary (tied below
    3B, as small models tie it), and the width whose layers (12 h^2 parameters each) fill the rest with about
    the width-to-depth ratio of models that size (SmolLM2-135M 576/30, TinyLlama 2048/22, Llama-2-7B 4096/32).
    It was h ~ (P * 128 / 12) ** (1/3) with the embeddings left out: at 7M the vocabulary alone (16M at width
    512) outweighed the model, and 4-bit weights came out larger than 16-bit ones."""
    tied = params < 3e9
    ratio = 24 if params < 5e8 else 64 if params < 3e9 else 128
    vocab = 32000
    best = None
    for h in [*range(64, 1024, 64), *range(1024, 32768 + 1, 128)]:
        body = params - vocab * h * (1 if tied else 2)
        if body < 12 * h * h:  # not one layer's worth left at this width
            break
        layers = body / (12 * h * h)
        miss = abs(math.log((h / layers) / ratio))
        if best is None or miss < best[0]:
            best = (miss, h, layers)
    if best is None:  # too small for this vocabulary at any width: a smaller vocabulary, one narrow layer
        h = 64
        vocab = max(256, int((params - 12 * h * h) / h))
        layers = 1.0
    else:
        _, h, layers = best
    heads = max(1, h // 64 if h < 1024 else h // 128)
    return ModelDims(name, params, max(1, int(round(layers))), h, int(h * 8 / 3 / 64 + 0.999) * 64, heads, heads,
                     vocab, tied, "estimated from a parameter count (Llama-like shape)")


def dims_from_file(cfg_file, name: str) -> ModelDims:
    """:func:`dims_from_config` of a config.json file; a file that is not JSON is a user's error that names it."""
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise FtUsageError(f"{cfg_file} is not valid JSON ({getattr(exc, 'msg', exc)}{where}). Fix the file, or plan "
                           "from a parameter count instead (e.g. %ft_plan 7B).") from None
    return dims_from_config(cfg, name, where=str(cfg_file))


def resolve_model(model: str) -> ModelDims:
    """A local model folder, a known hub id (or 'demo'), or a parameter count such as 7B / 135M."""
    m = (model or "").strip()
    if not m:
        raise FtUsageError("give a model: a local folder, a hub id such as meta-llama/Llama-2-7b-hf, or a size like 7B.")
    path = user_path(m)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FtUsageError(f"{m!r} has no config.json; %ft_plan needs a model folder or a size such as 7B.")
        return dims_from_file(cfg_file, path.name)
    match = _COUNT.match(m)
    if match:
        scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12, None: 1}[(match.group(2) or "").lower() or None]
        params = float(match.group(1)) * scale
        if params <= 0:
            raise FtUsageError(f"{m!r}: a model size must be positive, e.g. 135M or 7B.")
        if params < 1e6:
            raise FtUsageError(f"{m!r} is under a million parameters; write the size with a unit, e.g. 135M or 7B.")
        return dims_from_count(params, m.upper())
    from .loading import cached_hub_config

    cached = cached_hub_config(m) if m.count("/") == 1 else None  # a hub id the local cache holds
    if cached is not None:
        d = dims_from_file(cached, m)
        d.source = "its config in the local Hugging Face cache"
        return d
    key = _known(m)
    if key is not None:  # named as asked, and which entry's figures these are when it is another spelling
        same = m.lower() in (key.lower(), key.split("/")[-1].lower()) or m.lower() in _ALIASES  # 'demo', ...
        return ModelDims(key if same else m, *KNOWN_MODELS[key][:8],
                         "built-in table" if same else f"built-in table, the shape of {key}", *KNOWN_MODELS[key][8:])
    hint = did_you_mean(m, list(KNOWN_MODELS)) or did_you_mean(m, [k.split("/")[-1] for k in KNOWN_MODELS] + ["demo"])
    raise FtUsageError(
        f"unknown model {m!r}{hint}: not a local folder with config.json and not in the built-in "
        f"table or the local Hugging Face cache. Give a parameter count instead (e.g. %ft_plan 7B), a folder with "
        f"its config.json, or one of: {', '.join(k.split('/')[-1] for k in KNOWN_MODELS)}."
    )


# --------------------------------------------------------------------------- the plan
@dataclass
class ModePlan:
    mode: str
    weights: float
    adapter_optimizer: float
    activations: float
    overhead: float = OVERHEAD_BYTES
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.adapter_optimizer + self.activations + self.overhead


@dataclass
class Plan:
    dims: ModelDims
    seq_len: int
    batch_size: int
    r: int
    gradient_checkpointing: bool
    chunked_loss: bool
    modes: list
    optimizer: str = "adamw"
    objective: str = "sft"  # dpo / orpo: each example is a pair, two rows of the batch

    def mode(self, name: str) -> ModePlan:
        """The mode named ``name``; the full fine-tuning row answers to its AdamW name whatever the optimizer."""
        return next(m for m in self.modes if m.mode == name or m.mode.split(" (")[0] == name.split(" (")[0])

    def fit_text(self, memory: float, where: str = "") -> str:
        """Which modes fit in ``memory`` bytes, at which batch (see :func:`fit_advice`)."""
        return fit_advice(self, memory, where)

    def table(self) -> str:
        d = self.dims
        saving = optimizer_saving(self.optimizer)
        adam = optimizer_states(self.optimizer)[1]
        head = (f"Memory plan for {d.name} ({format_count(d.params)} parameters, {d.source}; "
                f"{d.layers} layers, hidden {d.hidden}, vocab {d.vocab}), seq_len {self.seq_len}, batch {self.batch_size}, "
                f"LoRA r={self.r} all-linear ({_millions(d.lora_params(self.r))} adapter params)"
                f"{', gradient checkpointing' if self.gradient_checkpointing else ''}"
                f"{', optimizer ' + self.optimizer if saving else ''}"
                f"{f', objective {self.objective} (each pair is two rows: activations of batch x 2)' if self.objective != 'sft' else ''}")
        names = ("weights", "adapter+opt", "activations", "overhead", "total")
        cells = [[_gb(v) for v in (m.weights, m.adapter_optimizer, m.activations, m.overhead, m.total)]
                 for m in self.modes]
        # each column as wide as its widest entry (a long sequence's terabytes, a long optimizer name) and a gap
        widths = [max([least] + [len(row[i]) + 2 for row in cells]) for i, least in enumerate((10, 13, 13, 10, 10))]
        label = max([34] + [len(m.mode) + 2 for m in self.modes])
        rows = [head] + ([d.experts_text()] if d.moe_layers else []) + [
            "", f"{'mode':<{label}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
        for m, row in zip(self.modes, cells):
            rows.append(f"{m.mode:<{label}}" + "".join(f"{c:>{w}}" for c, w in zip(row, widths)))
        rows += ["", "All figures are ESTIMATES (GB = 1e9 bytes) from these formulas:",
                 f"  full:  {FULL_BYTES - saving} B/param (bf16 weights 2 + bf16 grads 2 + fp32 master 4 + {adam} "
                 f"{ADAM_STATE_BYTES - saving})",
                 f"  LoRA:  2 B/param frozen 16-bit base; adapter {adapter_bytes(self.optimizer)} B/adapter param (fp32 w, grad, "
                 f"{adam} {ADAM_STATE_BYTES - saving})",
                 f"  QLoRA: {NF4_BITS:.3f} bits/param (NF4 codes + 8-bit absmax/64 + fp32 constant/16384); "
                 "embeddings and head 16-bit",
                 "  activations: seq * batch * layers * [2(6h + 2kv + 4i) + 8h (+ 3(6h + i) LoRA dropout)] bytes",
                 "               (gradient checkpointing: seq * batch * (layers * 2h + one layer's set))",
                 *(["               mixture-of-experts layers: i = the width of the experts a token runs, "
                    "+ (n - 1)h for n of them + E router logits"] if d.moe_layers else []),
                 "               + logits: seq * batch * vocab * 10 B (standard loss) or one chunk of 128 rows * vocab * 4 B, "
                 "at most 64 MB (chunked loss)",
                 "  overhead: ~0.5 GB runtime (CUDA context / CPU libraries)",
                 "Measured peaks on the demo model: see benchmarks/bench_planner.py (results/bench_planner.md)."]
        for m in self.modes:
            rows += [f"Note ({m.mode}): {n}" for n in m.notes]
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"model": self.dims.name, "params": self.dims.params, "source": self.dims.source,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "r": self.r,
                "modes": {m.mode: {"weights": m.weights, "adapter_optimizer": m.adapter_optimizer,
                                   "activations": m.activations, "overhead": m.overhead, "total": m.total}
                          for m in self.modes}}


def format_count(n: float) -> str:
    """A parameter count in billions, past 999.5B in trillions, below 1M in thousands: 0.135B, 46.7B, 7T (not
    7e+03B), 99.6K (not 9.96e-05B, which read as trillions)."""
    if n < 1e6:
        return f"{n / 1e3:.3g}K"
    billions = f"{n / 1e9:.3g}"
    if "e" not in billions:
        return billions + "B"
    trillions = n / 1e12
    return f"{trillions:.3g}T" if trillions < 999.5 else f"{trillions:,.0f}T"


def _millions(n: float) -> str:
    """4.9M; below 0.1M in thousands (a tiny model's adapter read '0.0M')."""
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.3g}K"


def _gb(n: float) -> str:
    return f"{n / GB:.2f}" if n < 10 * GB else f"{n / GB:.1f}"


def layer_activation_bytes(d: ModelDims, act_bytes: int = 2, lora_dropout: bool = False, moe: bool = False) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (Llama-style block, fused attention).

    Saved 16-bit tensors: the inputs of q/k/v, o, gate/up and down, q/k/v themselves, the attention output,
    the gate, up, activation and product tensors: 6h + 2kv + 4i elements; plus the fp32 copies the two
    RMSNorms keep (8h bytes). With LoRA dropout each adapted layer also keeps its dropout mask (1 byte) and
    dropped input (16-bit) for the 6h + i input elements of q, k, v, o, gate, up, down.
    A mixture-of-experts layer (``moe``) runs, per token, n MLPs (the routed experts and any shared one) of
    total width i (d.mlp_active): each keeps its own copy of the token's input (n - 1 more h) and the router
    keeps its E logits; with LoRA dropout each of the n MLPs' gate and up, and the router, keeps its input.
    """
    kv = d.kv_heads * d.head_dim
    n, i = d.mlp_active(moe)
    router = d.experts if moe else 0
    base = act_bytes * (6 * d.hidden + 2 * kv + 4 * i + (n - 1) * d.hidden + router) + 8 * d.hidden
    lora = (1 + act_bytes) * ((4 + 2 * n + (1 if moe else 0)) * d.hidden + i) if lora_dropout else 0
    return base + lora


def activation_bytes(d: ModelDims, seq_len: int, batch: int, ckpt: bool, chunked: bool, act_bytes: int = 2,
                     lora_dropout: bool = False) -> float:
    tokens = seq_len * batch
    kinds = [(count, layer_activation_bytes(d, act_bytes, lora_dropout, moe))
             for count, moe in ((d.dense_layers, False), (d.moe_layers, True)) if count]
    # with checkpointing: each layer's 16-bit input, plus one layer's full set (the largest) during its recompute
    body = tokens * ((d.layers * act_bytes * d.hidden + max(b for _, b in kinds)) if ckpt
                     else sum(count * b for count, b in kinds))
    logits = (chunk_bytes(min(auto_chunk_rows(d.vocab, checkpointed=ckpt), tokens), d.vocab, act_bytes) if chunked
              else tokens * d.vocab * LOGIT_BYTES_STANDARD)
    return body + logits


def plan(model: str | ModelDims, seq_len: int = 512, batch_size: int = 8, r: int = 16,
         gradient_checkpointing: bool = False, chunked_loss: bool = True, full_act_bytes: int = 2,
         overhead_bytes: float = OVERHEAD_BYTES, lora_dropout: bool = False, optimizer: str = "adamw",
         objective: str = "sft") -> Plan:
    """``full_act_bytes``: activation width of the full fine-tuning run (2 for bf16, 4 for an fp32 run);
    ``overhead_bytes``: the runtime's own memory (a measured figure where one is at hand);
    ``lora_dropout``: LoRA dropout > 0 (off by default in ft_magics), which keeps a copy of each adapted input;
    ``objective``: dpo / orpo / ipo / simpo train on pairs (two rows per example); DPO's and IPO's reference
    model is a second frozen copy under full fine-tuning, and the base itself (the adapter switched off) under LoRA and QLoRA."""
    from ..config import OBJECTIVES, REFERENCE_OBJECTIVES, objective_name, rows_per_example

    if objective not in OBJECTIVES:
        raise FtUsageError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}.")
    if seq_len < 1 or batch_size < 1:
        raise FtUsageError(f"--seq-len and --batch-size must be positive (got {seq_len}, {batch_size}).")
    if r < 1:
        raise FtUsageError(f"--r must be a positive LoRA rank (got {r}); try 8, 16 or 32.")
    d = model if isinstance(model, ModelDims) else resolve_model(model)
    p, emb, lora = d.params, d.embed_params, d.lora_params(r)
    rows = batch_size * rows_per_example(objective)  # a pair's chosen and rejected sides, as training batches them
    act_full = activation_bytes(d, seq_len, rows, gradient_checkpointing, False, full_act_bytes)
    act_peft = activation_bytes(d, seq_len, rows, gradient_checkpointing, chunked_loss, lora_dropout=lora_dropout)
    per_adapter = adapter_bytes(optimizer)
    # full fine-tuning's DPO (or IPO) keeps the starting model frozen beside it
    reference = 2 * p if objective in REFERENCE_OBJECTIVES else 0
    opt_name = "AdamW" if optimizer_states(optimizer) == OPTIMIZER_STATES["adamw"] else optimizer
    full = ModePlan(f"full fine-tuning (bf16 + {opt_name})", 2 * p + reference,
                    (FULL_BYTES - 2 - optimizer_saving(optimizer)) * p, act_full, overhead_bytes,
                    notes=["adapter+opt column holds the full model's gradients, fp32 master weights and Adam states"]
                    + ([f"weights include {objective_name(objective)}'s reference: a second, frozen bf16 copy of the model"]
                       if reference else []))
    shared = [f"{objective_name(objective)}'s reference is the base itself with the adapter switched off: no second copy"] \
        if reference else []
    lora16 = ModePlan("LoRA, 16-bit base", 2 * p, per_adapter * lora, act_peft, overhead_bytes, notes=list(shared))
    qlora = ModePlan("QLoRA, NF4 + double quant", (p - emb) * NF4_BITS / 8 + 2 * emb, per_adapter * lora, act_peft,
                     overhead_bytes, notes=list(shared))
    return Plan(d, seq_len, batch_size, r, gradient_checkpointing, chunked_loss, [full, lora16, qlora], optimizer,
                objective)


def seed_comparison(p: Optional[Plan] = None) -> str:
    """The seed's 70B table next to ours, with the reasons they differ."""
    p = p or plan("meta-llama/Llama-2-70b-hf", seq_len=512, batch_size=1)
    full, lora, q = p.mode("full fine-tuning (bf16 + AdamW)"), p.mode("LoRA, 16-bit base"), p.mode("QLoRA, NF4 + double quant")
    n = p.dims.params
    return "\n".join([
        f"Seed table (70B) vs computed for {p.dims.name}, seq {p.seq_len}, batch {p.batch_size}:",
        f"  full:  seed ~280 GB = 4 B/param (16-bit weights + 16-bit grads: {4 * n / GB:.0f} GB); with AdamW states and "
        f"an fp32 master copy it is {full.total / GB:.0f} GB (16 B/param).",
        f"  LoRA:  seed ~140 GB = 2 B/param; computed weights {lora.weights / GB:.0f} GB, total {lora.total / GB:.0f} GB "
        "(adapter, optimizer, activations on top).",
        f"  QLoRA: seed ~36 GB; computed weights {q.weights / GB:.1f} GB ({NF4_BITS:.3f} bits/param + 16-bit "
        f"embeddings), total {q.total / GB:.1f} GB.",
    ])


# --------------------------------------------------------------------------- will it fit?
_SIZE = re.compile(r"^\s*([-+]?\s*\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*$", re.I)


def parse_memory(text: str) -> float:
    """``24GB``, ``24G``, ``16GiB``, ``80`` (GB), ``512MB`` -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise FtUsageError(f"--memory {text!r} is not a size: write it like 24GB, 16GiB or 80 (GB), or 'here' for "
                           "this machine's accelerator (or RAM without one).")
    unit = (m.group(2) or "gb").lower()
    scale = {"g": GB, "gb": GB, "gib": 2**30, "m": 1e6, "mb": 1e6, "mib": 2**20, "t": 1e12, "tb": 1e12, "tib": 2**40}[unit]
    value = float(m.group(1).replace(" ", "")) * scale
    if value <= 0:
        raise FtUsageError(f"--memory must be positive (got {text!r}): give the memory to plan for, e.g. "
                           "--memory 24GB, or --memory here for this machine's.")
    return value


def memory_here() -> tuple:
    """``(bytes, what)``: the first CUDA GPU's total memory, else the machine's RAM."""
    import psutil

    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no usable torch: plan against RAM
        pass
    return float(psutil.virtual_memory().total), "this machine's RAM (no GPU)"


def fit_advice(p: "Plan", memory: float, where: str = "") -> str:
    """Per mode: whether the plan's batch fits ``memory``, and if not, the largest batch that does (with
    gradient checkpointing where it needs it, and the grad_accum that keeps the batch the same)."""
    from .memory import human_bytes

    lines = [f"In {human_bytes(memory)}{' (' + where + ')' if where else ''}:"]  # 10 MB was "In 0.0 GB"
    want = p.batch_size

    def total(mode, batch, ckpt):
        return plan(p.dims, p.seq_len, batch, p.r, gradient_checkpointing=ckpt, chunked_loss=p.chunked_loss,
                    optimizer=p.optimizer, objective=p.objective).mode(mode).total

    for m in p.modes:
        # a smaller batch (with grad_accum) first, down to 2; then gradient checkpointing, which costs a
        # recomputed forward (about a third more compute) but keeps the batch
        options = ([(b, p.gradient_checkpointing) for b in _halvings(want) if b >= min(2, want)]
                   + [(b, True) for b in _halvings(want)])
        fit = next(((b, c) for b, c in options if total(m.mode, b, c) <= memory), None)
        if fit is None:
            least = total(m.mode, 1, True)
            ways = "a smaller model or a shorter --seq-len" + ("" if m.mode.startswith("QLoRA") else ", or QLoRA")
            lines.append(f"  {m.mode}: does not fit, even at batch 1 with gradient checkpointing "
                         f"({least / GB:.1f} GB); choose {ways}.")
            continue
        b, ckpt = fit
        settings = ([f"batch_size: {b}"] if b < want else []) + ([f"grad_accum: {want // b}"] if b < want else []) \
            + (["gradient_checkpointing: true"] if ckpt and not p.gradient_checkpointing else [])
        how = f"batch {b}" + (" with gradient checkpointing" if ckpt and not p.gradient_checkpointing else "")
        lines.append(f"  {m.mode}: fits at {how}, {total(m.mode, b, ckpt) / GB:.1f} GB"
                     + (f" ({', '.join(settings)}{f': {want} examples per step' if b < want else ''})" if settings else "")
                     + ".")
    return "\n".join(lines)


def _halvings(n: int) -> list:
    out = []
    while n >= 1:
        out.append(n)
        n //= 2
    return out

