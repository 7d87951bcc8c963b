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
checkpointing: 2h bytes per layer plus one layer's full set. A model whose attention soft-caps its scores
(Gemma-2's attn_logit_softcapping) runs transformers' eager attention, which SDPA cannot replace: it keeps
each head's L x L scores, 8 bytes per query-key pair (soft-capped scores, fp32 softmax, its 16-bit copy).
Logits: the standard loss keeps s * b * V * (2 + 4 + 4) bytes (16-bit logits, fp32 copy, fp32 gradient);
ft_magics' chunked loss keeps one chunk (128 rows, 64 with gradient checkpointing, fewer where the fp32 block
would pass 64 MB: core.speed.auto_chunk_rows) of fp32 logits and their 16-bit copy, rows * V * (4 + 2) bytes.
A config with final_logit_softcapping cannot take the chunked loss (core.speed.chunked_loss_blocker): its
plan keeps the standard loss's logits.
Mixture of experts (Mixtral, Qwen-MoE, OLMoE, DeepSeek): every expert is held in memory, so the parameter count
and the weights count all of them; the all-linear adapter counts them where PEFT adapts them (EXPERTS_ADAPTED);
activations count the experts a token is routed to (num_experts_per_tok) and any shared experts
(ModelDims.experts_text says what was assumed).
Architectures: Llama-style decoders (LLAMA_STYLE_TYPES) and GPT-2 / GPT-NeoX (a fused q/k/v projection and a
two-matrix MLP) are modelled; another decoder is planned as a Llama-style one, with a note that says so; an
encoder-only or encoder-decoder model is refused, as ft_magics trains causal language models.
Runtime overhead: about 0.5 GB (CUDA context, or the CPU process's libraries); measured, not derived.
"""
from __future__ import annotations

import json
import math
import os
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
MAX_PLANNED_PARAMS = 1e14  # 100T: a size past this is a typo

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


def rank_refusal(given: str, fix: str, top_rank: int, of: str = "") -> FtUsageError:
    """The refusal of a LoRA rank above ``top_rank``, the widest rank any adapted layer can hold: a plan's
    (``given`` "--r 100,000") and a training run's ("r=128"), in one wording."""
    return FtUsageError(f"{given} is above the rank any adapted layer{of} can hold: the widest is {top_rank:,} (min of "
                        f"its inputs and outputs), so the extra rank adds parameters and no capacity. Use {fix} or "
                        "less; 8-64 covers most tasks.")


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
    experts_adapted: bool = True  # whether all-linear LoRA adapts the routed experts and the router (EXPERTS_ADAPTED)
    experts_adapted_source: str = ""  # empty where the model type says; else what was assumed
    # the block's linear layers: Llama's q, k, v, o and gate, up, down; GPT-2 / GPT-NeoX fuse q, k and v into one
    # projection and have a two-matrix MLP (no gate); Phi-3 fuses q/k/v and gate/up
    fused_qkv: bool = False
    gated_mlp: bool = True
    fused_gate_up: bool = False
    biases: bool = False  # LayerNorms with a bias and a bias on every linear layer (GPT-2, GPT-NeoX)
    position_embeddings: int = 0  # learned absolute positions (GPT-2's n_positions)
    standard_loss_only: str = ""  # why the chunked loss cannot run (final_logit_softcapping): plan full logits
    eager_attention: str = ""  # why attention keeps its L x L scores (attn_logit_softcapping: eager, not SDPA)
    notes: list = field(default_factory=list)  # what the plan assumed of this architecture, printed with it

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

    def attention_linears(self) -> list:
        """``(in, out)`` of each linear layer of one layer's attention: q, k, v, o, or qkv and o where fused."""
        h, q, kv = self.hidden, self.q_width, self.kv_heads * self.head_dim
        qkv = [(h, q + 2 * kv)] if self.fused_qkv else [(h, q), (h, kv), (h, kv)]
        return qkv + [(q, h)]

    def mlp_linears(self, width: int) -> list:
        """``(in, out)`` of each linear layer of an MLP of ``width``: gate, up, down (gate_up and down where
        fused); fc and proj where it has no gate."""
        h = self.hidden
        if not self.gated_mlp:
            return [(h, width), (width, h)]
        return ([(h, 2 * width)] if self.fused_gate_up else [(h, width), (h, width)]) + [(width, h)]

    @property
    def attention_linear_params(self) -> int:
        """q, k, v and o of one layer."""
        return sum(i * o for i, o in self.attention_linears())

    @property
    def moe_mlp_params(self) -> int:
        """One mixture-of-experts layer's MLP: every routed expert (gate, up, down), the shared experts, the router."""
        h = self.hidden
        return (3 * h * (self.experts * self.expert_intermediate + self.shared_intermediate) + h * self.experts
                + (h if self.shared_expert_gate else 0))

    @property
    def vector_params(self) -> int:
        """Norm weights and biases: Llama's two RMSNorms per layer and a final one; GPT-2's two LayerNorms (weight
        and bias) and the linear layers' biases per layer, and a final LayerNorm."""
        h = self.hidden
        if not self.biases:
            return self.layers * 2 * h + h
        outs = sum(o for _, o in self.attention_linears() + self.mlp_linears(self.intermediate))
        return self.layers * (4 * h + outs) + 2 * h

    @property
    def body_linear_params(self) -> int:
        return (self.layers * self.attention_linear_params
                + self.dense_layers * sum(i * o for i, o in self.mlp_linears(self.intermediate))
                + self.moe_layers * self.moe_mlp_params)

    def mlp_active(self, moe: bool) -> tuple:
        """``(MLPs a token runs, their total width)`` in a dense (``moe=False``) or a mixture-of-experts layer."""
        if not moe:
            return 1, self.intermediate
        shared = 1 if self.shared_intermediate else 0
        return (self.experts_per_token + shared,
                self.experts_per_token * self.expert_intermediate + self.shared_intermediate)

    def lora_params(self, r: int = 16) -> int:
        """Adapter parameters for r on all linear layers (q, k, v, o, gate, up, down: r * (in + out) each). In a
        mixture-of-experts layer all-linear adapts the shared experts, and, where PEFT adapts them
        (``experts_adapted``), every routed expert, with transformers' fused expert weights (gate_up_proj at rank
        2r, down_proj at r: r * (3h + 5 * width) per expert), and the router."""
        h = self.hidden
        attention = r * sum(i + o for i, o in self.attention_linears())
        dense = r * sum(i + o for i, o in self.mlp_linears(self.intermediate))
        moe = ((self.experts * r * (3 * h + 5 * self.expert_intermediate) + r * (h + self.experts)
                if self.experts_adapted else 0)
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
        adapted = (f"the all-linear adapter counts all {self.experts} and the router (PEFT adapts them)"
                   if self.experts_adapted else
                   "the all-linear adapter counts none of the routed experts nor the router (PEFT adapts only "
                   "the attention" + (" and the shared expert" if self.shared_intermediate else "") + " here)")
        why = f" ({self.experts_adapted_source})" if self.experts_adapted_source else ""
        return (f"Mixture of experts: {self.experts} experts of width {self.expert_intermediate} in each of "
                f"{self.moe_layers} layers{dense}. Weights count all {self.experts} (every expert is held in "
                f"memory); {adapted}{why}; activations count the {self.experts_per_token} "
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
    "mistralai/Mistral-7B-Instruct-v0.2": (7.24e9, 32, 4096, 14336, 32, 8, 32000, False),
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
# the table's entries whose architecture is not plain Llama: their model_type (see _architecture)
_TABLE_TYPES = {"google/gemma-2-2b": "gemma2", "google/gemma-2-9b": "gemma2",
                "microsoft/Phi-3-mini-4k-instruct": "phi3"}


def _known(name: str) -> Optional[str]:
    key = _ALIASES.get(name.lower(), name)
    low = {k.lower(): k for k in KNOWN_MODELS}
    short = {k.split("/")[-1].lower(): k for k in KNOWN_MODELS}
    k = key.lower().removesuffix("-instruct").removesuffix("-chat-hf").removesuffix("-hf").removesuffix("-it")
    k = k.replace("-instruct-v", "-v")  # Mistral-7B-Instruct-v0.3: the shape of Mistral-7B-v0.3
    for cand in (key.lower(), k, k + "-hf", k + "-instruct"):
        if cand in low:
            return low[cand]
        if cand in short:
            return short[cand]
        if cand.split("/")[-1] in short:
            return short[cand.split("/")[-1]]
    return None


# Decoders whose layers are Llama's (q, k, v, o; a gated gate/up/down MLP; norms), as the planner models them
LLAMA_STYLE_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "olmo", "olmo2", "olmoe", "granite", "smollm3"})
# Decoders modelled with their own linear layers: (fused q/k/v, gated MLP, fused gate/up, biases)
OTHER_MODELLED_TYPES = {"gpt2": (True, False, False, True), "gpt_neox": (True, False, False, True),
                        "phi3": (True, True, True, False)}
# Not causal language models (ft_magics trains decoders): encoder-only types; encoder-decoder ones say
# is_encoder_decoder in their config, and these types are always one
ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "albert", "electra", "deberta", "deberta-v2",
    "camembert", "mpnet", "modernbert", "ernie", "megatron-bert", "roformer", "roc_bert", "data2vec-text", "xmod",
    "nomic_bert", "esm", "convbert", "funnel", "longformer", "squeezebert", "rembert", "big_bird", "canine"})
ENCODER_DECODER_TYPES = frozenset({
    "t5", "mt5", "umt5", "longt5", "bart", "mbart", "pegasus", "pegasus_x", "marian", "led", "blenderbot",
    "blenderbot-small", "plbart", "prophetnet", "bigbird_pegasus", "mvp", "whisper", "encoder-decoder"})
# Decoder types whose transformers config class ties the output head to the embeddings when config.json leaves
# tie_word_embeddings out (as Gemma's and GPT-2's published configs do); tests/test_planner.py checks each
# against transformers' config classes. Any other type defaults to untied, as Llama's does.
TIED_BY_DEFAULT = frozenset({
    "biogpt", "bloom", "cohere", "cohere2", "cohere2_moe", "ctrl", "ernie4_5", "ernie4_5_moe", "falcon", "gemma",
    "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo",
    "jetmoe", "lfm2", "lfm2_moe", "minicpm3", "mpt", "openai-gpt", "opt", "recurrent_gemma", "smollm3",
    "starcoder2", "vaultgemma", "xglm", "zamba", "zamba2"})
# Config defaults of the soft-capping keys where config.json leaves them out (Gemma2Config's)
SOFTCAP_DEFAULTS = {"gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}}
# Mixture-of-experts types whose routed experts and router PEFT's all-linear adapts (with transformers 5's fused
# expert weights, PEFT converts the targets of these types only); for the others it adapts the nn.Linear layers
# left, such as Qwen2-MoE's shared expert and its gate. tests/test_planner.py checks both against PEFT.
EXPERTS_ADAPTED = frozenset({"mixtral", "minimax", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                             "qwen3_next", "glm4_moe", "ernie4_5_moe", "dots1", "flex_olmo", "hunyuan_v1_moe"})
EXPERTS_NOT_ADAPTED = frozenset({"qwen2_moe", "phimoe", "granitemoe", "gpt_oss", "llama4_text"})


def _refuse_non_causal(cfg: dict, model_type: str, where: str) -> None:
    """A user's error for an encoder-only or encoder-decoder config: ft_magics trains causal LMs only."""
    archs = [str(a) for a in cfg.get("architectures") or []]
    arch = f" ({', '.join(archs)})" if archs else ""
    causal = any(a.endswith(("CausalLM", "LMHeadModel")) for a in archs)
    if cfg.get("is_encoder_decoder") or model_type in ENCODER_DECODER_TYPES:
        kind = "an encoder-decoder model"
    elif not causal and (model_type in ENCODER_TYPES or any(a.endswith("ForMaskedLM") for a in archs)):
        kind = "an encoder-only model"
    else:
        return
    raise FtUsageError(f"{where} is {kind}{arch}, model_type {model_type or '?'}: ft_magics fine-tunes causal "
                       "(decoder-only) language models, so %ft_plan plans only those. Plan a decoder instead: a "
                       "folder or hub id of a causal LM (Llama, Qwen, Mistral, Gemma...), or a size such as 7B.")


def _architecture(cfg: dict, model_type: str) -> dict:
    """ModelDims' fields for what the planner knows of ``model_type``'s layers, loss and attention, with notes."""
    fields, notes = {}, []
    if model_type in OTHER_MODELLED_TYPES:
        fused_qkv, gated, fused_gate_up, biases = OTHER_MODELLED_TYPES[model_type]
        fields.update(fused_qkv=fused_qkv, gated_mlp=gated, fused_gate_up=fused_gate_up, biases=biases,
                      position_embeddings=int(cfg.get("n_positions") or 0) if model_type == "gpt2" else 0)
    elif model_type and model_type not in LLAMA_STYLE_TYPES:
        notes.append(f"not a Llama-style decoder (model_type {model_type}): the figures assume one (q, k, v, o "
                     "and a gate/up/down MLP per layer), so its parameter count, adapter and activations may be off.")
    caps = SOFTCAP_DEFAULTS.get(model_type, {})
    final = cfg.get("final_logit_softcapping", caps.get("final_logit_softcapping"))
    if final not in (None, 0, 1, 1.0):
        fields["standard_loss_only"] = f"its config sets final_logit_softcapping={final}"
        notes.append(f"{fields['standard_loss_only']}: training cannot use the chunked loss and keeps the standard "
                     "loss's full logits (seq * batch * vocab * 10 B), planned here for LoRA and QLoRA too.")
    attn = cfg.get("attn_logit_softcapping", caps.get("attn_logit_softcapping"))
    if attn not in (None, 0):
        fields["eager_attention"] = f"its config sets attn_logit_softcapping={attn}"
        notes.append(f"{fields['eager_attention']}: transformers runs its attention eagerly (SDPA cannot soft-cap), "
                     "keeping each head's seq x seq scores: seq * batch * layers * heads * seq * 8 B, planned here.")
    fields["notes"] = notes
    return fields


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
    model_type = str(cfg.get("model_type") or "")
    _refuse_non_causal(cfg, model_type, where)
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
        moe = _moe_from_config(cfg, g, layers, inter, model_type) if experts > 1 else {}
    except (TypeError, ValueError) as exc:
        raise FtUsageError(f"{where} has a size that is not a whole number ({exc}). {fix}") from None
    tied = cfg.get("tie_word_embeddings")  # left out: the default of the type's config class
    tied = bool(tied) if tied is not None else model_type in TIED_BY_DEFAULT
    d = ModelDims(name, 0, layers, hidden, inter, heads, kv, vocab, tied, "config", head_dim, **moe,
                  **_architecture(cfg, model_type))
    d.params = d.body_linear_params + d.embed_params + d.vector_params + d.position_embeddings * hidden
    return d


def _moe_from_config(cfg: dict, g, layers: int, inter: int, model_type: str = "") -> dict:
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
                experts_per_token_source=source, experts_adapted=model_type not in EXPERTS_NOT_ADAPTED,
                experts_adapted_source="" if model_type in EXPERTS_ADAPTED | EXPERTS_NOT_ADAPTED else
                f"assumed: PEFT's handling of model_type {model_type or '(none given)'} is not known to the planner")


# a parameter count: 7B, 135M, 7e9, 7bn, 7G, 7,000M, 1.5 B (k / m / b = bn = g / t, any case)
# a sign is read so that "-7B" is refused as a size that must be positive, not looked up as a model name
_COUNT = re.compile(r"^\s*(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:e\d+)?)\s*(k|m|b|bn|g|t)?\s*$", re.I)
_COUNT_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9, "bn": 1e9, "g": 1e9, "t": 1e12, "": 1}


# width-to-depth ratio h / layers of models of a size (SmolLM2-135M 576/30, TinyLlama-1.1B 2048/22,
# Llama-2-7B 4096/32): (parameters, ratio) anchors, log-linear between them and flat beyond. The ratio grows
# slower than the square root of the count, so width and depth both grow with it (see dims_from_count).
_SHAPE_RATIOS = ((1e8, 24.0), (1e9, 64.0), (7e9, 128.0))


def _shape_ratio(params: float) -> float:
    (p0, r0), *_ = _SHAPE_RATIOS
    if params <= p0:
        return r0
    for (p0, r0), (p1, r1) in zip(_SHAPE_RATIOS, _SHAPE_RATIOS[1:]):
        if params <= p1:
            return r0 * (r1 / r0) ** (math.log(params / p0) / math.log(p1 / p0))
    return _SHAPE_RATIOS[-1][1]


def dims_from_count(params: float, name: str) -> ModelDims:
    """A Llama-shaped model of ``params`` parameters, embeddings included: a 32,000-token vocabulary (tied below
    3B, as small models tie it), and the depth L and width h = ratio * L whose layers (12 h^2 parameters each)
    and one vocabulary's embeddings add up to the count, the ratio that of models that size (_SHAPE_RATIOS).
    Every shape figure (width, depth, MLP width, heads) rises with the count and never falls, so neither does any
    planned total: the width is rounded down to a multiple of 64 (128 from 1024), the depth to the nearest layer,
    and the shape is solved with the embeddings counted once whether or not they are tied. (A step ratio, 24 /
    64 / 128 at 5e8 and 3e9, gave 499M 42 layers of 960 but 500M 19 of 1408: 8.51 GB of QLoRA, then 5.96.)"""
    tied = params < 3e9
    vocab = 32000
    ratio = _shape_ratio(params)
    # 12 ratio^2 L^3 + vocab * ratio * L = params, increasing in L: solve by bisection
    lo, hi = 0.0, max(1.0, (params / (12 * ratio ** 2)) ** (1 / 3) + 1)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 12 * ratio ** 2 * mid ** 3 + vocab * ratio * mid < params else (lo, mid)
    width = ratio * lo
    h = max(64, int(width // 128) * 128 if width >= 1024 else int(width // 64) * 64)
    if vocab * h * (1 if tied else 2) >= params:  # a vocabulary this size outweighs the model: a smaller one
        vocab = max(256, int(params / (2 * h)))
    layers = max(1, int(round(lo)))
    heads = max(1, min(h // 64, max(16, h // 128)))  # 64-wide heads up to 16 of them, 128-wide from h 2048
    return ModelDims(name, params, layers, h, int(h * 8 / 3 / 64 + 0.999) * 64, heads, heads,
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


def _looks_like_path(m: str) -> bool:
    """Whether ``m`` is written as a file-system path (./x, ~/x, /x, a\\b, a/b/c), not as a hub id (owner/name)."""
    return m.startswith((".", "/", "~")) or "\\" in m or m.count("/") > 1 or m.endswith("/")


def resolve_model(model) -> ModelDims:
    """A local model folder (or its config.json), a known hub id (or 'demo'), or a parameter count such as 7B /
    135M / 7e9 / 7bn. ``model``: a str or an os.PathLike."""
    m = os.fspath(model).strip() if isinstance(model, os.PathLike) else (model or "").strip()
    if not m:
        raise FtUsageError("give a model: a local folder, a hub id such as meta-llama/Llama-2-7b-hf, or a size like 7B.")
    path = user_path(m)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FtUsageError(f"{m!r} has no config.json; %ft_plan needs a model folder or a size such as 7B.")
        return dims_from_file(cfg_file, path.name)
    if path.is_file() and path.suffix.lower() == ".json":  # a model's config.json itself
        return dims_from_file(path, path.parent.name or path.stem)
    match = _COUNT.match(m)
    if match:
        params = float(match.group(1).replace(",", "")) * _COUNT_SCALE[(match.group(2) or "").lower()]
        if params <= 0:
            raise FtUsageError(f"{m!r}: a model size must be positive, e.g. 135M or 7B.")
        if params < 1e6:
            raise FtUsageError(f"{m!r} is under a million parameters; write the size with a unit, e.g. 135M or 7B.")
        if params > MAX_PLANNED_PARAMS:
            raise FtUsageError(f"{m!r} is {params:.3g} parameters, past any model (the largest published have a few "
                               "trillion); write the size with a unit, e.g. 70B or 1.8T.")
        return dims_from_count(params, m.upper())
    if _looks_like_path(m):  # not a hub id, not a size: a folder that is not there
        raise FtUsageError(f"no such folder: {m!r} (looked for {path.absolute()}). Give the folder of a model with its "
                           "config.json, a hub id such as meta-llama/Llama-2-7b-hf, or a size such as 7B.")
    from .loading import cached_hub_config

    cached = cached_hub_config(m) if m.count("/") == 1 else None  # a hub id the local cache holds
    if cached is not None:
        d = dims_from_file(cached, m)
        d.source = "its config in the local Hugging Face cache"
        return d
    key = _known(m)
    if key is not None:  # named as asked, and which entry's figures these are when it is another spelling
        same = m.lower() in (key.lower(), key.split("/")[-1].lower()) or m.lower() in _ALIASES  # 'demo', ...
        d = ModelDims(key if same else m, *KNOWN_MODELS[key][:8],
                      "built-in table" if same else f"built-in table, the shape of {key}", *KNOWN_MODELS[key][8:])
        for attr, value in (_architecture({}, _TABLE_TYPES[key]) if key in _TABLE_TYPES else {}).items():
            setattr(d, attr, value)
        return d
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
        rows = [head] + ([d.experts_text()] if d.moe_layers else []) + [f"Note: {n}" for n in d.notes] + [
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
                 *([f"               + eager attention scores: seq * batch * layers * heads * seq * {score_bytes()} B "
                    "(soft-capped scores, fp32 softmax, 16-bit copy)"] if d.eager_attention else []),
                 "               + logits: seq * batch * vocab * 10 B (standard loss"
                 + (f", as {d.standard_loss_only})" if d.standard_loss_only else
                    f") or one chunk of {self._chunk_rows()} rows * vocab * 6 B (fp32 logits and their 16-bit "
                    "copy; fewer rows where the fp32 block would pass 64 MB) (chunked loss)"),
                 "  overhead: ~0.5 GB runtime (CUDA context / CPU libraries)",
                 "Measured peaks on the demo model: see benchmarks/bench_planner.py (results/bench_planner.md)."]
        for m in self.modes:
            rows += [f"Note ({m.mode}): {n}" for n in m.notes]
        return "\n".join(rows)

    def _chunk_rows(self) -> int:
        """Rows of the chunked loss's chunk for this plan (128, 64 with gradient checkpointing, fewer for a large
        vocabulary), as core.speed.auto_chunk_rows picks them."""
        return min(auto_chunk_rows(self.dims.vocab, checkpointed=self.gradient_checkpointing), self.seq_len *
                   self.batch_size)

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


def score_bytes(act_bytes: int = 2) -> int:
    """Bytes eager attention keeps per head and query-key pair: the soft-capped scores (tanh's output), the fp32
    softmax and its copy in the compute dtype that multiplies v (none in fp32): 8 either way (measured with
    saved-tensor hooks on a tiny Gemma-2, bf16 and fp32)."""
    return act_bytes + 4 + (act_bytes if act_bytes < 4 else 0)


def layer_activation_bytes(d: ModelDims, act_bytes: int = 2, lora_dropout: bool = False, moe: bool = False,
                           seq_len: int = 0) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (Llama-style block, fused attention).

    Saved 16-bit tensors: the inputs of q/k/v, o, gate/up and down, q/k/v themselves, the attention output,
    the gate, up, activation and product tensors: 6h + 2kv + 4i elements (2i for an MLP without a gate: fc's
    output and the activation's); plus the fp32 copies the two RMSNorms keep (8h bytes). With LoRA dropout each
    adapted layer also keeps its dropout mask (1 byte) and dropped input (16-bit) for the 6h + i input elements
    of q, k, v, o, gate, up, down (one input for a fused q/k/v or gate/up, none for an absent gate).
    A mixture-of-experts layer (``moe``) runs, per token, n MLPs (the routed experts and any shared one) of
    total width i (d.mlp_active): each keeps its own copy of the token's input (n - 1 more h) and the router
    keeps its E logits; with LoRA dropout each of the n MLPs' gate and up, and the router, keeps its input.
    Eager attention (``d.eager_attention``) also keeps heads * ``seq_len`` scores per token (score_bytes each).
    """
    kv = d.kv_heads * d.head_dim
    n, i = d.mlp_active(moe)
    router = d.experts if moe else 0
    mlp = 4 if d.gated_mlp else 2
    base = act_bytes * (6 * d.hidden + 2 * kv + mlp * i + (n - 1) * d.hidden + router) + 8 * d.hidden
    scores = d.heads * seq_len * score_bytes(act_bytes) if d.eager_attention else 0
    inputs = (1 if d.fused_qkv else 3) + 1 + n * (2 if d.gated_mlp and not d.fused_gate_up else 1) + (1 if moe else 0)
    lora = (1 + act_bytes) * (inputs * d.hidden + i) if lora_dropout else 0
    return base + scores + lora


def activation_bytes(d: ModelDims, seq_len: int, batch: int, ckpt: bool, chunked: bool, act_bytes: int = 2,
                     lora_dropout: bool = False) -> float:
    """Activations of a batch of ``batch`` rows of ``seq_len`` tokens; ``chunked``: ft_magics' chunked loss,
    where the model can take it (not with final_logit_softcapping: ``d.standard_loss_only``)."""
    tokens = seq_len * batch
    chunked = chunked and not d.standard_loss_only
    kinds = [(count, layer_activation_bytes(d, act_bytes, lora_dropout, moe, seq_len))
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
    from ..config import MAX_SEQ_LEN

    if seq_len < 1 or batch_size < 1:
        raise FtUsageError(f"--seq-len and --batch-size must be positive (got {seq_len}, {batch_size}).")
    if seq_len > MAX_SEQ_LEN:  # as a training run's max_seq_len
        raise FtUsageError(f"--seq-len must be at most {MAX_SEQ_LEN} (got {seq_len:,}), as a training run's max_seq_len.")
    if r < 1:
        raise FtUsageError(f"--r must be a positive LoRA rank (got {r}); try 8, 16 or 32.")
    d = model if isinstance(model, ModelDims) else resolve_model(model)
    top_rank = max((min(i, o) for i, o in list(d.attention_linears()) + list(d.mlp_linears(d.intermediate))), default=0)
    if top_rank and r > top_rank:  # as a training run refuses it (core.training.check_adapter_fits)
        raise rank_refusal(f"--r {r:,}", f"--r {top_rank}", top_rank, f" of {d.name}")
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
                    notes=["adapter+opt column holds the full model's gradients, fp32 master weights and the "
                           f"optimizer's states ({optimizer_states(optimizer)[1]})"]
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
        f"The often-quoted 70B table (~280 / ~140 / ~36 GB) vs computed for {p.dims.name}, seq {p.seq_len}, "
        f"batch {p.batch_size}:",
        f"  full:  quoted ~280 GB = 4 B/param (16-bit weights + 16-bit grads: {4 * n / GB:.0f} GB); with AdamW states "
        f"and an fp32 master copy, 16 B/param: {16 * n / GB:.0f} GB, {full.total / GB:.0f} GB with activations "
        "and overhead.",
        f"  LoRA:  quoted ~140 GB = 2 B/param; computed weights {lora.weights / GB:.0f} GB, total {lora.total / GB:.0f} "
        "GB (adapter, optimizer, activations on top).",
        f"  QLoRA: quoted ~36 GB; computed weights {q.weights / GB:.1f} GB ({NF4_BITS:.3f} bits/param + 16-bit "
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

    def mode_plan(mode, batch, ckpt, optimizer=p.optimizer):
        return plan(p.dims, p.seq_len, batch, p.r, gradient_checkpointing=ckpt, chunked_loss=p.chunked_loss,
                    optimizer=optimizer, objective=p.objective).mode(mode)

    def total(mode, batch, ckpt, optimizer=p.optimizer):
        return mode_plan(mode, batch, ckpt, optimizer).total

    # a smaller batch (with grad_accum) first, down to 2; then gradient checkpointing, which costs a
    # recomputed forward (about a third more compute) but keeps the batch
    options = ([(b, p.gradient_checkpointing) for b in _halvings(want) if b >= min(2, want)]
               + [(b, True) for b in _halvings(want)])
    for m in p.modes:
        fit = next(((b, c) for b, c in options if total(m.mode, b, c) <= memory), None)
        if fit is None:
            least = mode_plan(m.mode, 1, True)
            # 8-bit Adam states where the optimizer keeps more (10 instead of 16 B per trained parameter)
            q8 = next(((b, c) for b, c in options if total(m.mode, b, c, "adamw_8bit") <= memory), None) \
                if optimizer_saving(p.optimizer) < optimizer_saving("adamw_8bit") else None
            ways = ["a smaller model"]
            if least.total - least.activations < memory:  # a shorter sequence helps only where the rest fits
                ways.append("a shorter --seq-len")
            if not m.mode.startswith("QLoRA"):
                ways.append("QLoRA")
            eight = (f"; with --optimizer adamw_8bit it fits at batch {q8[0]}"
                     f"{' with gradient checkpointing' if q8[1] and not p.gradient_checkpointing else ''} "
                     f"({total(m.mode, *q8, 'adamw_8bit') / GB:.1f} GB)" if q8 else "")
            lines.append(f"  {m.mode}: does not fit, even at batch 1 with gradient checkpointing "
                         f"({least.total / GB:.1f} GB){eight}; "
                         f"{'otherwise ' if q8 else ''}choose {_either(ways)}.")
            continue
        b, ckpt = fit
        settings = ([f"batch_size: {b}"] if b < want else []) + ([f"grad_accum: {want // b}"] if b < want else []) \
            + (["gradient_checkpointing: true"] if ckpt and not p.gradient_checkpointing else [])
        how = f"batch {b}" + (" with gradient checkpointing" if ckpt and not p.gradient_checkpointing else "")
        lines.append(f"  {m.mode}: fits at {how}, {total(m.mode, b, ckpt) / GB:.1f} GB"
                     + (f" ({', '.join(settings)}{f': {want} examples per step' if b < want else ''})" if settings else "")
                     + ".")
    return "\n".join(lines)


def _either(options: list) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)


def _halvings(n: int) -> list:
    out = []
    while n >= 1:
        out.append(n)
        n //= 2
    return out

