"""Training speed and memory levers that sit on top of ``transformers.Trainer``.

The big one is the *chunked loss*. The standard causal-LM forward computes full-vocabulary logits for
every position of the batch (batch x seq x vocab), upcasts them to fp32 for the cross-entropy and keeps
them, and their gradient, alive until the backward pass: for the demo model at batch 8 x 256 tokens that
is 400 MB per fp32 copy, and most rows are prompt or padding positions whose loss is masked out anyway.

Here the decoder runs to its final hidden states only; the rows whose next token carries loss are
gathered, and the output projection + cross-entropy run over them in chunks of ``chunk_rows`` rows. Each
chunk's gradient with respect to its hidden rows (and the head weight, if it trains) is computed right
away, inside the forward, so no logits survive the chunk: peak extra memory is one chunk of fp32 logits.
The result is the same loss (sum over loss-bearing tokens / their count, or / ``num_items_in_batch``
under gradient accumulation, like transformers' ``ForCausalLMLoss``) and the same gradients.

Models whose head is not a plain bias-free linear layer over the decoder output (logit soft-capping,
logit scaling, a custom head) fall back to the standard forward, with a note.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, NamedTuple, Optional

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 64 * 2**20  # at most this much fp32 logits held per chunk
DEFAULT_CHUNK_ROWS = 128  # and at most this many rows
CHECKPOINTED_CHUNK_ROWS = 64  # with gradient checkpointing, where memory is what the run is short of


def auto_chunk_rows(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES, checkpointed: bool = False) -> int:
    """Rows per chunk: 128 (64 with gradient checkpointing), or fewer so that one chunk of fp32 logits stays
    within ``budget_bytes`` (at least 16 rows). Measured on the demo model's head (vocab 49152, bf16, 2 cores),
    loss forward + backward over 2000 rows: 128-row chunks (24 MB) 503 ms, 341-row chunks (64 MB) 643 ms,
    32-row 674 ms; over 250 rows they are within noise. Smaller chunks also lower the peak that the loss adds:
    with gradient checkpointing on the bundled set, 32-row chunks peaked at 966 MB RSS against 1016 MB (10 steps,
    3 runs each), but for steps 1-5% slower, which took the checkpointed run under 1.5x the reference's speed
    in one make bench. 64-row chunks there (20 steps, two runs each in turns): peak 870-872 MB against
    887-916 MB with 128, at 127 against 125-138 loss tokens/s. So a checkpointed run, which asked for memory
    over speed, takes 64; ``loss_chunk_rows`` sets any other."""
    rows = CHECKPOINTED_CHUNK_ROWS if checkpointed else DEFAULT_CHUNK_ROWS
    return max(16, min(rows, int(budget_bytes // (4 * max(vocab_size, 1)))))


def chunk_bytes(rows: int, vocab_size: int, compute_bytes: int = 2) -> int:
    """What one chunk's logits blocks take (:class:`LossWorkspace`): fp32, plus the compute dtype's copy."""
    return rows * vocab_size * (4 + (compute_bytes if compute_bytes < 4 else 0))


# --------------------------------------------------------------------------- the loss itself
class LossWorkspace:
    """The chunked loss's two logits blocks (``chunk_rows x vocab``: the compute dtype and fp32), kept from
    one chunk, and one step, to the next.

    Allocated afresh for every chunk, these blocks (37 MB for 128 rows of the demo model's 49k vocabulary)
    land wherever the heap has room between the step's other tensors, and on the CPU the holes they leave
    raise the process's peak RSS by more than their size (demo model, bundled set, gradient checkpointing,
    10 steps, 3 runs each in alternating order: 1045 MB peak with fresh blocks, 1003 MB reused, the same
    speed). Reused, they cost their size once. The trainer holds one for the whole run and drops it at
    the end (:meth:`clear`)."""

    def __init__(self):
        self._blocks: dict = {}

    def blocks(self, rows: int, vocab: int, dtype, device):
        """``(low, high)``: views of ``rows x vocab`` in ``dtype`` and in fp32 (the same tensor when
        ``dtype`` is fp32), grown when asked for more rows than they hold."""
        import torch

        key = (vocab, dtype, torch.device(device))
        held = self._blocks.get(key)
        if held is None or held[1].shape[0] < rows:
            self._blocks.pop(key, None)  # the smaller pair goes before the larger is made
            high = torch.empty(rows, vocab, dtype=torch.float32, device=device)
            low = high if dtype == torch.float32 else torch.empty(rows, vocab, dtype=dtype, device=device)
            held = self._blocks[key] = (low, high)
        return held[0][:rows], held[1][:rows]

    def clear(self) -> None:
        self._blocks.clear()


def _compute_dtype_of(h, weight):
    """The dtype ``h @ weight.T`` computes in here: autocast's where it is on, else the promoted one."""
    import torch

    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunk_loss_and_grads(h, weight, targets, chunk_rows: int, want_h: bool, want_w: bool,
                          workspace: Optional[LossWorkspace] = None, per_row: bool = False):
    """Summed cross-entropy of ``h @ weight.T`` against ``targets``; gradients of that sum if wanted.
    ``per_row``: each row's cross-entropy (N,) instead of the sum; the gradients are then each row's own
    (row i of ``grad_h`` is d CE_i / d h_i), which is what a loss that weighs rows differently needs.

    Each chunk's logits go into the ``workspace`` blocks (a fresh workspace, freed on return, if none is
    given); the fp32 block turns into log-probabilities, the softmax and then the logits' gradient in place,
    and the low block takes that gradient in the compute dtype."""
    import torch

    n = h.shape[0]
    cd = _compute_dtype_of(h, weight)
    w = weight.to(cd)  # once per call, not once per chunk
    ws = workspace if workspace is not None else LossWorkspace()
    total = torch.zeros(n if per_row else (), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    with torch.autocast(h.device.type, enabled=False):  # inputs are cast already; out= variants below
        for s in range(0, n, chunk_rows):
            hc = h[s:s + chunk_rows].to(cd)
            tc = targets[s:s + chunk_rows]
            low, high = ws.blocks(hc.shape[0], w.shape[0], cd, h.device)
            torch.mm(hc, w.t(), out=low)  # logits in the compute dtype, as lm_head(h) gives them
            if high is not low:
                high.copy_(low)  # and in fp32, as the standard loss's .float() gives them
            # log-probabilities in place: one fused pass (logsumexp, then a subtraction and an exp over the
            # block, took 6.7 instead of 4.4 ms for 128 rows of a 49k vocabulary with the exp below)
            torch.log_softmax(high, dim=-1, out=high)
            if per_row:
                total[s:s + chunk_rows] = -high.gather(1, tc[:, None])[:, 0]
            else:
                total -= high.gather(1, tc[:, None]).sum()
            if want_h or want_w:
                probs = high.exp_()  # softmax, in place
                probs[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                g = low.copy_(probs) if low is not high else probs  # d(sum CE)/d(logits)
                if want_h:
                    if grad_h.dtype == cd:
                        torch.mm(g, w, out=grad_h[s:s + chunk_rows])
                    else:
                        grad_h[s:s + chunk_rows] = g @ w
                if want_w:
                    grad_w += (g.t() @ hc).float()
    return total, grad_h, grad_w


def _autograd_fn():
    import torch

    class ChunkedCrossEntropy(torch.autograd.Function):
        """Loss = sum CE / denom; gradients computed chunk by chunk in the forward and scaled in backward."""

        @staticmethod
        def forward(ctx, h, weight, targets, chunk_rows, denom, workspace):
            want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            total, grad_h, grad_w = _chunk_loss_and_grads(h, weight, targets, chunk_rows, want_h, want_w, workspace)
            ctx.denom = denom
            ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
            ctx.which = (want_h, want_w)
            ctx.w_dtype = weight.dtype
            return total / denom

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            scale = grad_out / ctx.denom
            gh = gw = None
            if ctx.which[0]:
                g = saved.pop(0)
                gh = g * scale.to(g.dtype)
            if ctx.which[1]:
                gw = (saved.pop(0) * scale).to(ctx.w_dtype)
            return gh, gw, None, None, None, None

    return ChunkedCrossEntropy


def _token_logprobs_fn():
    import torch

    class ChunkedTokenLogProbs(torch.autograd.Function):
        """Each row's log-probability of its target; each row's gradient is computed chunk by chunk in the
        forward (as for the summed loss) and scaled by that row's incoming gradient in the backward."""

        @staticmethod
        def forward(ctx, h, targets, weight, chunk_rows, workspace):
            each, grad_h, _ = _chunk_loss_and_grads(h, weight, targets, chunk_rows, True, False, workspace,
                                                    per_row=True)
            ctx.save_for_backward(grad_h)
            return -each

        @staticmethod
        def backward(ctx, grad_out):
            g, = ctx.saved_tensors  # d CE_i / d h_i; log p = -CE
            return -g * grad_out[:, None].to(g.dtype), None, None, None, None

    return ChunkedTokenLogProbs


_FN = None
_LOGP_FN = None


def chunked_token_logprobs(h, weight, targets, chunk_rows: int, workspace: Optional[LossWorkspace] = None):
    """log p(``targets[i]`` | ``h[i]``) under the head ``weight``, (N,) in fp32, without full-vocabulary logits
    for all rows at once; differentiable with respect to ``h`` (a frozen head: the preference losses of
    :mod:`core.preference` train adapters only, so a head that trains takes the full-logits path)."""
    import torch

    global _LOGP_FN
    chunk_rows = max(1, int(chunk_rows))
    if h.shape[0] == 0 or not torch.is_grad_enabled() or not h.requires_grad:
        each, _, _ = _chunk_loss_and_grads(h, weight, targets, chunk_rows, False, False, workspace, per_row=True)
        return -each
    if _LOGP_FN is None:
        _LOGP_FN = _token_logprobs_fn()
    return _LOGP_FN.apply(h, targets, weight.detach(), chunk_rows, workspace)


def chunked_cross_entropy(h, weight, targets, chunk_rows: int, num_items: Optional[Any] = None,
                          workspace: Optional[LossWorkspace] = None):
    """Mean (or sum / ``num_items``) cross-entropy of ``h @ weight.T`` vs ``targets``, in row chunks.

    ``h``: (N, hidden) rows that carry loss; ``weight``: (vocab, hidden); ``targets``: (N,) token ids;
    ``workspace``: chunk blocks to reuse (see :class:`LossWorkspace`).
    """
    import torch

    global _FN
    if _FN is None:
        _FN = _autograd_fn()
    n = h.shape[0]
    if num_items is None:
        denom = float(max(n, 1))
    else:
        denom = float(num_items.item() if torch.is_tensor(num_items) else num_items)
        denom = max(denom, 1.0)
    if n == 0:  # nothing to learn from in this batch: a zero that keeps the graph connected
        return h.sum() * 0.0
    chunk_rows = max(1, int(chunk_rows))
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        total, _, _ = _chunk_loss_and_grads(h, weight, targets, chunk_rows, False, False, workspace)
        return total / denom
    return _FN.apply(h, weight, targets, chunk_rows, denom, workspace)


# --------------------------------------------------------------------------- model plumbing
def _causal_lm(model):
    """The transformers ``*ForCausalLM`` under a PEFT wrapper (LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def chunked_loss_blocker(model) -> Optional[str]:
    """Why the chunked loss cannot be used on ``model`` (None when it can)."""
    import torch

    lm = _causal_lm(model)
    cfg = getattr(lm, "config", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    decoder = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if head is None or decoder is None or decoder is lm:
        return "the model has no separate decoder and output head"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"its output head is a {type(head).__name__} (not a plain bias-free Linear)"
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        v = getattr(cfg, attr, None)
        if v not in (None, 1, 1.0):
            return f"its config sets {attr}={v} (the head is not a plain projection)"
    if getattr(cfg, "output_router_logits", False) and getattr(cfg, "router_aux_loss_coef", 0):
        # the model's own loss adds router_aux_loss_coef x the experts' load-balancing loss: the chunked loss,
        # which runs the decoder alone, would leave that term out (and its gradient, which balances the experts)
        return (f"its config sets output_router_logits with router_aux_loss_coef={cfg.router_aux_loss_coef} (the "
                "loss includes the experts' load-balancing term)")
    return None


def causal_lm_chunked_loss(model, inputs: dict, chunk_rows: int = 0, num_items: Optional[Any] = None,
                           workspace: Optional[LossWorkspace] = None):
    """The causal-LM loss of ``model`` on ``inputs`` (with ``labels``) without full-vocabulary logits."""
    rows, targets, _, head = loss_rows(model, inputs)
    rows_per_chunk = chunk_rows or auto_chunk_rows(head.weight.shape[0])
    return chunked_cross_entropy(rows, head.weight, targets, rows_per_chunk, num_items, workspace)


def summed_loss(model, inputs: dict, chunked: bool, chunk_rows: int = 0, workspace: Optional[LossWorkspace] = None):
    """``(the causal-LM loss of the batch ``inputs`` summed over its loss-bearing tokens, their count)``, both
    tensors: one batch of the eval loss, total over all batches / count over all batches. ``%lora_eval``
    (core.evaluation) and a training run's own evaluation (:func:`speed_trainer_class`) both report that
    token-weighted mean, so they agree. ``chunked``: through the chunked loss (no full-vocabulary logits); else
    the logits and a cross-entropy in fp32, as the model's own loss computes it."""
    import torch.nn.functional as F

    labels = inputs["labels"]
    count = (labels[..., 1:] != IGNORE_INDEX).sum()
    if chunked:
        return causal_lm_chunked_loss(model, inputs, chunk_rows, num_items=1, workspace=workspace), count
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, count


def loss_rows(model, inputs: dict):
    """The decoder's final hidden states where the next token carries loss: ``(rows (N, hidden), their target
    tokens (N,), the (batch, length - 1) mask that picked them, the output head)``. No logits are made."""
    lm = _causal_lm(model)
    decoder = getattr(lm, getattr(lm, "base_model_prefix", "model"))
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("num_items_in_batch", None)
    inputs.pop("use_cache", None)  # packed batches (core.data.collate_packed) carry use_cache=False; passed below
    out = decoder(**inputs, use_cache=False)
    hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
    shift = labels[:, 1:]
    mask = shift != IGNORE_INDEX
    return hidden[:, :-1][mask], shift[mask], mask, lm.get_output_embeddings()


def _half(dtype) -> bool:
    import torch

    return dtype in (torch.bfloat16, torch.float16)


def autocast_only(model, dtype):
    """``torch.autocast`` in ``dtype`` on the model's device type (a no-op context unless bf16/fp16)."""
    import torch

    if not _half(dtype):
        return contextlib.nullcontext()
    device = next((p.device.type for p in model.parameters()), "cpu")
    return torch.autocast(device_type=device, dtype=dtype)


def no_input_casting(model, dtype, tuner_layers: Optional[list] = None):
    """PEFT's cast of each LoRA layer's input to the adapter dtype, switched off (a no-op unless bf16/fp16).

    It must stay off for the whole training step, backward included: gradient checkpointing recomputes
    the forward during the backward, and the recomputed tensors must have the dtypes of the first pass.
    ``tuner_layers`` (see :func:`model_walks`) spares PEFT's helper its two walks over every module.
    """
    if not _half(dtype):
        return contextlib.nullcontext()
    if tuner_layers is not None:
        from .lean import attribute_set

        return attribute_set(tuner_layers, "cast_input_dtype_enabled", False)
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


class ModelWalks(NamedTuple):
    """What the training loop's per-step bookkeeping looks for in the model, listed once (``lean_steps``)."""

    modules: list  # every module: train()/eval() touch each one
    tuner_layers: list  # PEFT's layers: the input-casting switch
    trainable: list  # the parameters that get gradients: zero_grad and clipping


def model_walks(model) -> ModelWalks:
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = list(model.modules())
    return ModelWalks(modules, [m for m in modules if isinstance(m, BaseTunerLayer)],
                      [p for p in model.parameters() if p.requires_grad])


@contextlib.contextmanager
def listed_step_calls(model, walks: ModelWalks):
    """``model.train()`` and ``model.zero_grad()`` over the lists in ``walks`` while inside.

    The Trainer calls both on every step. Each walks the whole module tree: about 4,400 modules on the demo
    model with LoRA on every linear layer, tens of milliseconds of Python per call, which is more than a
    step's work on a GPU. Here ``train(mode)`` returns at once when every module already is in ``mode``
    (else it runs the model's own), and ``zero_grad`` clears the trainable parameters' gradients, the only
    ones a LoRA step makes. The model's own methods are back on exit.
    """
    own_train = model.train
    saved = {k: model.__dict__[k] for k in ("train", "zero_grad") if k in model.__dict__}

    def train(mode: bool = True):
        if all(m.training == mode for m in walks.modules):
            return model
        return own_train(mode)

    def zero_grad(set_to_none: bool = True) -> None:
        for p in walks.trainable:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:  # as nn.Module.zero_grad does
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    model.train, model.zero_grad = train, zero_grad  # instance attributes shadow the methods
    try:
        yield
    finally:
        for k in ("train", "zero_grad"):
            model.__dict__.pop(k, None)
        model.__dict__.update(saved)


def autocast_context(model, dtype, tuner_layers: Optional[list] = None):
    """``torch.autocast`` in ``dtype`` (bf16/fp16) with PEFT's input casting off, or a no-op context.

    Without it PEFT casts every LoRA layer's input to the adapter's fp32 dtype, so each adapted layer keeps
    an fp32 copy of its input (plus the dropout output) for the backward pass: on the demo model that is
    more memory than all the base layers' activations. Under autocast the LoRA matmuls run in bf16 on
    the bf16 activations while the adapter weights (and AdamW) stay fp32.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(autocast_only(model, dtype))
    stack.enter_context(no_input_casting(model, dtype, tuner_layers))
    return stack


SHORT_ATTENTION_LEN = 128  # at or below this padded length: whole-row attention, probabilities kept
ATTENTION_SCORES_BYTES = 16 << 20  # longer rows: query blocks sized so one block's scores stay under this
ATTENTION_BLOCK_ROWS = 64  # the query block for long rows (demo model, 437 tokens: 32-96 within 10%)


def without_padding_mask(inputs: dict) -> dict:
    """``inputs`` without the attention mask where that mask only marks right padding (``causal_mask_only``).

    In a causal model each position attends to itself and earlier positions, so with right padding every
    real token sees only real tokens: the padding mask changes nothing for the tokens that carry loss (pad
    positions carry none), and positions come from the index either way. Told only that attention is
    causal, the flash kernels skip the blocks above the diagonal, which a mask tensor makes them compute.
    Measured on the demo model (2 cores, batch 8, steps timed in one process in alternating order): on the
    varying-length set (flash attention) 1.67 instead of 1.82 s per step (-8%, two rounds), on the bundled
    set (short rows, plain kernel) no difference (0.767 vs 0.760 s, four rounds); the same losses.
    A mask with left padding, holes or values other than 0/1, and batches with position_ids (packed rows),
    keep it.
    """
    mask = inputs.get("attention_mask")
    if mask is None or "position_ids" in inputs or mask.dim() != 2:
        return inputs
    # ones, then zeros: no 1 after a 0 (left padding, holes) and nothing but 0/1; one host sync for all
    right_padding = ((mask == 0) | (mask == 1)).all() & (mask[:, :-1] >= mask[:, 1:]).all()
    return {k: v for k, v in inputs.items() if k != "attention_mask"} if bool(right_padding) else inputs


def attention_for(inputs: dict, model):
    """The attention for this batch on the CPU: ft_magics' own causal attention (:func:`causal_grouped_attention`)
    in place of transformers' SDPA function, with SDPA behind it for what it does not cover.

    For causal rows without a mask (``causal_mask_only``) that is, up to ``SHORT_ATTENTION_LEN`` tokens,
    two batched matmuls and a softmax over whole rows, and above it the same by blocks of query rows
    (:func:`block_causal_attention`). PyTorch's CPU kernels are slower at every length here: demo shape,
    8 x 9 query / 3 key-value heads, bf16, forward + backward per layer: 1.75 instead of 3.25 ms (math
    kernel) at 85 tokens, 2.8 instead of 5.6 ms at 128; 23 instead of 68-78 ms (flash) at 437, 30 instead
    of 88-94 ms at 512, 134 instead of 213-220 ms at 1024.

    What goes to SDPA (a mask: left padding, packed rows; dropout; a window) gets the math kernel in the
    16-bit input dtype for short rows, where its fixed cost is lower than flash attention's, rather than
    upcasting q, k, v and the scores to fp32 (its default): the matmuls still accumulate in fp32 and softmax
    computes in fp32, but what autograd keeps is half the size (demo shape at 80 tokens, forward + backward:
    2.7 ms instead of 4.4-5.0 ms, flash 9.8 ms, outputs equal to 1e-5). Longer rows keep PyTorch's choice.
    """
    ids = inputs.get("input_ids")
    if ids is None or ids.device.type != "cpu":
        return contextlib.nullcontext()
    if getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") != "sdpa":
        return contextlib.nullcontext()
    return _causal_row_attention(math_kernel=ids.shape[-1] <= SHORT_ATTENTION_LEN)


@contextlib.contextmanager
def _causal_row_attention(math_kernel: bool = True):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    flags = torch.backends.cuda  # the flag is global (it names CUDA, the math kernel reads it on every device)
    before = flags.fp16_bf16_reduction_math_sdp_allowed()
    own = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = functools.partial(causal_grouped_attention, fallback=sdpa)
    try:
        if math_kernel:
            flags.allow_fp16_bf16_reduction_math_sdp(True)
        with sdpa_kernel(SDPBackend.MATH) if math_kernel else contextlib.nullcontext():
            yield
    finally:
        flags.allow_fp16_bf16_reduction_math_sdp(before)
        if own is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = own
        _causal_bias.cache_clear()  # a step's layers share one bias; none is kept after it
        _PACKED_CHECKS.clear()
        _LAYOUTS.clear()


@functools.lru_cache(maxsize=4)
def _causal_bias(length: int, groups: int, dtype, device, group_major: bool = True):
    """``(groups * length, length)``: 0 where a row's position may attend (at or before it), -inf after.
    Rows are (group, position) when ``group_major`` (row ``r`` is position ``r % length``), else
    (position, group) (position ``r // groups``)."""
    import torch

    i = torch.arange(length, device=device)
    allowed = i[:, None] >= i[None, :]
    allowed = allowed.repeat(groups, 1) if group_major else allowed.repeat_interleave(groups, 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def causal_grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, *, fallback, **kwargs):
    """Causal attention with grouped query heads, as two batched matmuls and a softmax: over whole rows up
    to ``SHORT_ATTENTION_LEN`` tokens, by blocks of query rows above (:func:`block_causal_attention`);
    anything else (a mask, dropout, a sliding window, soft-capping, a cache, non-causal attention, value
    heads of another width than the query's) goes to ``fallback`` (transformers' SDPA function).

    For short rows on the CPU this is what PyTorch's math kernel computes, less its overheads: the kernel
    repeats each key/value head for its query heads (and sums the copies' gradients back, a strided
    reduction), builds the causal mask on every call and runs a "safe" softmax that looks for fully masked
    rows, which a causal row never is. Here the query heads that share a key/value head are stacked along
    the rows, so every key/value head is read once, the mask is a cached additive bias folded into the
    first matmul (``baddbmm``), and the softmax is the plain one. Same arithmetic in the same 16-bit dtype.
    """
    b, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    unsupported = (not causal or dropout or length < 2 or key.shape[2] != length or heads % kv_heads
                   or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
                   or kwargs.get("output_attentions") or (window is not None and window < length)
                   or not query.dtype == key.dtype == value.dtype or value.shape[-1] != dim)
    # a mask is taken only where it is exactly the packed rows' causal-within-each-example mask
    docs = None if unsupported or attention_mask is None else \
        packed_documents(attention_mask, kwargs.get("position_ids"), b, length)
    if unsupported or (attention_mask is not None and docs is None):
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    if docs is not None:
        if DOCUMENT_ROWS if DOCUMENT_ROWS is not None else b == 1:
            return attention_by_documents(query, key, value, scale, document_rows(docs)), None
        return block_causal_attention(query, key, value, scale, docs), None
    return _causal_rows(query, key, value, scale), None


def _causal_rows(query, key, value, scale: float):
    """Causal grouped-query attention of whole rows (b, heads, L, d) -> (b, L, heads, d): the scores of a row
    at once up to ``SHORT_ATTENTION_LEN`` tokens, by blocks of query rows above."""
    import torch

    b, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length > SHORT_ATTENTION_LEN:
        return block_causal_attention(query, key, value, scale)
    groups = heads // kv_heads  # query head j * groups + g reads key/value head j (transformers' repeat_kv)
    q = query.reshape(b * kv_heads, groups * length, dim)
    k = key.reshape(b * kv_heads, length, dim)
    v = value.reshape(b * kv_heads, length, dim)
    scores = torch.baddbmm(_causal_bias(length, groups, query.dtype, query.device), q, k.transpose(1, 2),
                           alpha=scale)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(b, heads, length, dim).transpose(1, 2).contiguous()


class DocumentRows(NamedTuple):
    """The documents of ``docs`` (b, L) as rows of their own, in groups of similar length: per group
    ``(index, n, width)``, where ``index`` (n * width,) picks for row i slot j the position (of the b * L) of
    token j of the group's document i (its last token past its end: right padding, which a causal row never
    reads for its real tokens); ``inverse`` (b * L,) is each position's slot in the groups' rows laid end to
    end."""
    groups: list
    inverse: Any


# the documents of one row (a padding-free batch) attend as rows of their own (document_rows); those of several
# packed rows by blocks along the rows (block_causal_attention), already batched over the rows: 8 rows of 512
# tokens of 20-120-token examples, demo shape, forward + backward, 36 ms either way, and 58 against 75 ms where
# a few examples are far longer than the rest. True / False: always one or the other.
DOCUMENT_ROWS = None
DOCUMENT_GROUP_SHARE = 0.75  # a group of documents takes the next-longest while it is this share of the first


def document_rows(docs) -> DocumentRows:
    """The documents of ``docs`` (b, L) laid out for attention as rows of their own: sorted by length and
    grouped, each group right-padded to its longest document (a document joins a group while it has at least
    ``DOCUMENT_GROUP_SHARE`` of the group's first one's length, so padding at most doubles a group's scores).

    A padding-free batch (one row of all the batch's examples) so attends like the padded batch, as a batch of
    rows: attention by blocks along the long row ran many small multiplies instead (one padding-free row of 8
    examples of 350-512 tokens, demo shape, forward + backward: 178-200 ms against 57, the padded batch 58).
    Computed once per mask (every layer shares it)."""
    import torch

    key = id(docs)
    if key in _LAYOUTS and _LAYOUTS[key][0] is docs:
        return _LAYOUTS[key][1]
    b, length = docs.shape
    dev = docs.device
    ids = (docs + torch.arange(b, device=dev)[:, None] * (length + 1)).reshape(-1)
    _, counts = torch.unique_consecutive(ids, return_counts=True)
    starts = counts.cumsum(0) - counts
    lengths = counts.tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, base, doc_base = [], 0, [0] * len(lengths)
    while order:
        width = lengths[order[0]]
        n = next((j for j, i in enumerate(order) if lengths[i] < DOCUMENT_GROUP_SHARE * width), len(order))
        members, order = order[:n], order[n:]
        for r, i in enumerate(members):
            doc_base[i] = base + r * width
        sel = torch.tensor(members, device=dev)
        slot = torch.arange(width, device=dev)
        index = (starts[sel, None] + torch.minimum(slot[None, :], counts[sel, None] - 1)).reshape(-1)
        groups.append((index, n, width))
        base += n * width
    doc_of = torch.repeat_interleave(torch.arange(len(lengths), device=dev), counts)
    inverse = torch.tensor(doc_base, device=dev)[doc_of] + torch.arange(b * length, device=dev) - starts[doc_of]
    layout = DocumentRows(groups, inverse)
    _LAYOUTS.clear()  # one set of documents per forward
    _LAYOUTS[key] = (docs, layout)
    return layout


_LAYOUTS: dict = {}


def attention_by_documents(query, key, value, scale: float, layout: DocumentRows):
    """Causal attention within each document, each document gathered into a row of its own
    (:func:`document_rows`): (b, heads, L, d) -> (b, L, heads, d), the gradients scattered back by autograd."""
    import torch

    b, heads, length, dim = query.shape
    flat = [x.transpose(1, 2).reshape(b * length, x.shape[1], dim) for x in (query, key, value)]
    outs = []
    for index, n, width in layout.groups:
        q, k, v = (x.index_select(0, index).view(n, width, x.shape[1], dim).transpose(1, 2) for x in flat)
        outs.append(_causal_rows(q, k, v, scale).reshape(n * width, heads, dim))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.index_select(0, layout.inverse).view(b, length, heads, dim)


def _query_block(batch_heads: int, groups: int, length: int, itemsize: int) -> int:
    """Query positions per block: ``ATTENTION_BLOCK_ROWS``, fewer where one block's scores would pass
    ``ATTENTION_SCORES_BYTES`` (long rows, many heads), never under 16."""
    fit = ATTENTION_SCORES_BYTES // max(1, batch_heads * groups * length * itemsize)
    return max(16, min(ATTENTION_BLOCK_ROWS, fit))


@functools.cache
def _block_causal_fn():
    import torch

    class BlockCausalAttention(torch.autograd.Function):
        """Causal grouped-query attention by blocks of query rows; the backward recomputes each block's
        probabilities instead of keeping them (what flash attention keeps: q, k, v)."""

        @staticmethod
        def forward(ctx, query, key, value, scale, docs):
            b, heads, length, dim = query.shape
            kv = key.shape[1]
            groups = heads // kv
            # rows ordered (position, group): a block of positions is a contiguous run of rows
            q = query.reshape(b, kv, groups, length, dim).transpose(2, 3).reshape(b * kv, length * groups, dim)
            k, v = key.reshape(b * kv, length, dim), value.reshape(b * kv, length, dim)
            block = _query_block(b * kv, groups, length, q.element_size())
            out = torch.empty_like(q)
            with torch.autocast(query.device.type, enabled=False):
                for s, e, k0, scores in _block_scores(q, k, scale, block, groups, docs):
                    torch.bmm(torch.softmax(scores, dim=-1), v[:, k0:e], out=out[:, s * groups:e * groups])
            ctx.save_for_backward(q, k, v)
            ctx.docs = docs
            ctx.scale, ctx.block, ctx.shape = scale, block, (b, heads, length, dim, kv, groups)
            # (b, kv, L, groups, d) -> (b, L, heads, d): transformers' attention output layout
            return out.view(b, kv, length, groups, dim).permute(0, 2, 1, 3, 4).reshape(b, length, heads, dim)

        @staticmethod
        def backward(ctx, dout):
            q, k, v = ctx.saved_tensors
            b, heads, length, dim, kv, groups = ctx.shape
            do = dout.reshape(b, length, kv, groups, dim).transpose(1, 2).reshape(b * kv, length * groups, dim)
            do = do.to(q.dtype)
            dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
            with torch.autocast(q.device.type, enabled=False):
                for s, e, k0, scores in _block_scores(q, k, ctx.scale, ctx.block, groups, ctx.docs):
                    rows = slice(s * groups, e * groups)
                    probs = torch.softmax(scores, dim=-1)
                    dv[:, k0:e].baddbmm_(probs.transpose(1, 2), do[:, rows])
                    dprobs = torch.bmm(do[:, rows], v[:, k0:e].transpose(1, 2))
                    dscores = torch._softmax_backward_data(dprobs, probs, -1, probs.dtype).mul_(ctx.scale)
                    torch.bmm(dscores, k[:, k0:e], out=dq[:, rows])
                    dk[:, k0:e].baddbmm_(dscores.transpose(1, 2), q[:, rows])
            dq = dq.view(b, kv, length, groups, dim).transpose(2, 3).reshape(b, heads, length, dim)
            return dq, dk.view(b, kv, length, dim), dv.view(b, kv, length, dim), None, None

    return BlockCausalAttention


def _block_scores(q, k, scale, block, groups, docs=None):
    """``(start, end, first, scores)`` per block of query positions: the scaled scores of rows ``start..end``
    against keys ``first..end`` with the causal bias on the diagonal block (keys past ``end`` are never read).
    Without ``docs`` ``first`` is 0; with ``docs`` (b, L), each position sees only the earlier positions of its
    own document, and ``first`` is where the block's first document begins (the earliest over the rows):
    keys before it belong to earlier documents and are not multiplied at all. So a packed row of n
    examples costs about what its examples cost apart, not the causal half of the whole row."""
    import torch

    length = k.shape[1]
    bias = _causal_bias(block, groups, q.dtype, q.device, group_major=False)  # the diagonal block's
    # each block's first key, read to the host once for all blocks
    firsts = [0] * len(range(0, length, block)) if docs is None else \
        _document_starts(docs)[:, ::block].amin(0).tolist()
    for s, k0 in zip(range(0, length, block), firsts):
        e = min(s + block, length)
        scores = torch.bmm(q[:, s * groups:e * groups], k[:, k0:e].transpose(1, 2)).mul_(scale)
        if docs is None:
            scores[:, :, s:e].add_(bias[:(e - s) * groups, :e - s])
        else:
            allowed = _within_documents(docs, s, e, e, first_key=k0)
            doc_bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
            b = docs.shape[0]  # rows (position, group): (b * kv, n * groups, e - k0) -> (b, kv, n, groups, e - k0)
            scores.view(b, -1, e - s, groups, e - k0).add_(doc_bias[:, None, :, None, :])
        yield s, e, k0, scores


def _document_starts(docs):
    """``(b, L)``: the position at which each position's document begins (``docs``: nondecreasing document
    numbers along each row, as :func:`packed_documents` makes them)."""
    import torch

    at = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return torch.where(first, at, torch.zeros_like(at)).cummax(1).values


def packed_documents(attention_mask, position_ids, batch: int, length: int):
    """``(batch, length)`` document numbers where ``attention_mask`` (transformers' 4-D SDPA mask, boolean or
    additive) is exactly causal attention within each run of consecutive ``position_ids`` (packed rows: a
    restart begins a new example; padding is a run of its own), else None.

    Checked against the mask itself, once per mask (every layer of a forward shares it), so a mask that
    also hides anything else (left padding, a window) keeps its own kernel."""
    import torch

    if position_ids is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 \
            or tuple(attention_mask.shape[-2:]) != (length, length) or attention_mask.shape[0] not in (1, batch):
        return None
    key = (id(attention_mask), attention_mask._version, id(position_ids))
    if key in _PACKED_CHECKS:
        return _PACKED_CHECKS[key][-1]
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] != length or pos.shape[0] not in (1, batch):
        return None
    pos = pos.expand(batch, length)
    start = torch.ones(batch, length, dtype=torch.bool, device=pos.device)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    docs = start.cumsum(1)
    given = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    given = given.expand(batch, 1, length, length)
    ok = True
    for s in range(0, length, 256):  # by row blocks: no batch x L x L comparison at once
        e = min(s + 256, length)
        if not torch.equal(given[:, 0, s:e], _within_documents(docs, s, e, length)):
            ok = False
            break
    _PACKED_CHECKS.clear()  # one mask per forward: the last one is all that is worth keeping
    _PACKED_CHECKS[key] = (attention_mask, position_ids, docs if ok else None)  # held: their ids stay theirs
    return docs if ok else None


_PACKED_CHECKS: dict = {}


def _within_documents(docs, start: int, end: int, keys: int, first_key: int = 0):
    """``(b, end - start, keys - first_key)``: whether query position ``start..end`` may attend to key
    ``first_key..keys``: at or before it, in the same document (``docs``: b x L document numbers)."""
    import torch

    q_at = torch.arange(start, end, device=docs.device)
    k_at = torch.arange(first_key, keys, device=docs.device)
    return (docs[:, start:end, None] == docs[:, None, first_key:keys]) & (q_at[:, None] >= k_at[None, :])


def block_causal_attention(query, key, value, scale: float, docs=None):
    """Causal attention of ``query`` (b, heads, L, d) over ``key``/``value`` (b, kv_heads, L, d), by blocks of
    query rows, as (b, L, heads, d); with ``docs`` (b, L) (see :func:`packed_documents`) within each
    document only.

    Each block of query positions multiplies against the keys up to its own end only (the causal half),
    softmax, then the values; the backward recomputes a block's scores and probabilities rather than
    keeping L x L of them per layer, so memory is what flash attention keeps. Faster than PyTorch's CPU
    flash kernel in 16 bits at every length measured (see :func:`attention_for`), exact in fp64."""
    return _block_causal_fn().apply(query, key, value, scale, docs)


def speed_trainer_class():
    """``transformers.Trainer`` with the chunked loss, autocast, and a loss-only evaluation step."""
    import torch
    from transformers import Trainer

    class SpeedTrainer(Trainer):
        """Trainer whose loss never materialises full-vocabulary logits for the batch (``chunked``), whose
        forward runs under autocast in the compute dtype (``autocast_dtype``), whose evaluation returns
        the loss only (no logits gathered across the eval set: nothing here uses them), whose per-step
        bookkeeping uses lists of the model's modules and parameters made once (``lean_steps``), and whose
        right-padded batches reach the model without their padding mask (``causal_mask_only``). Its eval loss
        is token-weighted (:func:`summed_loss`), as ``%lora_eval``'s: the Trainer's own is a mean of the batches'
        means, which weighs a batch of a few short answers as much as one of long ones."""

        chunk_rows: int = 0
        chunked: bool = True
        autocast_dtype = None
        lean_steps: bool = False
        causal_mask_only: bool = False
        own_attention: bool = True  # ft_magics' CPU attention (attention_for); off where every lever is off
        preference = None  # (objective, beta, gamma): a DPO / ORPO / IPO / SimPO run on pairs (core.preference)
        _pair_metrics = None  # {"train" | "eval": {metric: [batch values]}} until the next log
        _walks = None  # (model, ModelWalks)
        _flop_params = None
        _loss_workspace = None
        _workspace_users = 0
        _eval_sums = None  # while an evaluation runs: per batch, (its loss summed over its loss tokens, their count)

        def _save(self, output_dir=None, state_dict=None):
            """A checkpoint holds the adapter being trained: PEFT saves every adapter loaded beside it otherwise
            (a copy of each in every checkpoint, written at every save)."""
            model = self.accelerator.unwrap_model(self.model)
            active = getattr(model, "active_adapter", None)
            if not isinstance(active, str) or len(getattr(model, "peft_config", None) or {}) < 2:
                return super()._save(output_dir, state_dict)
            model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=[active])
            try:
                return super()._save(output_dir, state_dict)
            finally:
                del model.save_pretrained  # the class's method again

        def walks(self) -> Optional[ModelWalks]:
            """The lists for ``self.model`` (made on first use), or None when ``lean_steps`` is off."""
            if not self.lean_steps:
                return None
            if self._walks is None or self._walks[0] is not self.model:
                self._walks = (self.model, model_walks(self.model))
            return self._walks[1]

        def _tuner_layers(self):
            walks = self.walks()
            return walks.tuner_layers if walks is not None else None

        @contextlib.contextmanager
        def loss_blocks(self):
            """The chunked loss's workspace lives while training or evaluation runs (the outermost of the
            two, as training evaluates inside; a caller that evaluates after training holds it across
            both), then its blocks are freed."""
            if self._loss_workspace is None:
                self._loss_workspace = LossWorkspace()
            self._workspace_users += 1
            try:
                yield
            finally:
                self._workspace_users -= 1
                if not self._workspace_users:
                    self._loss_workspace.clear()

        def train(self, *args, **kwargs):
            walks = self.walks()
            with listed_step_calls(self.model, walks) if walks is not None else contextlib.nullcontext(), \
                    self.loss_blocks():
                return super().train(*args, **kwargs)

        def evaluate(self, *args, **kwargs):
            with self.loss_blocks():
                return super().evaluate(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            # forward and backward (where checkpointed layers are recomputed) see the same LoRA input dtypes
            # and the same attention kernel
            with no_input_casting(model, self.autocast_dtype, self._tuner_layers()), self._attention(inputs, model):
                return super().training_step(model, inputs, *args, **kwargs)

        def _attention(self, inputs, model):
            return attention_for(inputs, _causal_lm(model)) if self.own_attention else contextlib.nullcontext()

        def floating_point_ops(self, inputs) -> int:
            # Trainer's count, 6 x tokens x non-embedding parameters, with the parameters counted once: the
            # model's count walks every module on every step
            main = getattr(self.model, "main_input_name", "input_ids")
            if not self.lean_steps or main not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._flop_params is None:
                self._flop_params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._flop_params

        def _clip_grad_norm(self, model):
            # the same clipping over the trainable parameters, listed once, rather than a generator over every
            # parameter of the model; distributed set-ups other than plain data parallelism keep the Trainer's
            from accelerate.utils import DistributedType

            walks = self.walks()
            plain = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                          DistributedType.MULTI_GPU)
            if walks is None or not plain or (self.args.fp16 and _sagemaker_mp()):
                return super()._clip_grad_norm(model)
            return self.accelerator.clip_grad_norm_(walks.trainable, self.args.max_grad_norm)

        def _model_inputs(self, inputs):
            return without_padding_mask(inputs) if self.causal_mask_only else inputs

        def _pair_step(self, model, inputs, phase: str):
            from .preference import pair_step

            loss, metrics = pair_step(model, self._model_inputs(inputs), *self.preference, self.chunk_rows,
                                      self._loss_workspace, self.chunked)
            kept = self._pair_metrics.setdefault(phase, {})
            for k, v in metrics.items():  # tensors: read back when logged, not now (no host sync per step)
                kept.setdefault(k, []).append(v)
            return loss

        def log(self, logs, *args, **kwargs):
            # the pair metrics of the batches since the last log: eval ones beside eval_loss, train ones beside loss
            phase = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
            # (every process logs at the same step, so under several processes the means of all the processes'
            # batches, as the loss beside them is: each process holds as many batches as the others)
            kept = (self._pair_metrics or {}).pop(phase, None)
            if kept:
                prefix = "eval_" if phase == "eval" else ""
                names = sorted(kept)
                means = torch.stack([torch.stack(kept[k]).float().mean() for k in names])
                if self.accelerator.num_processes > 1:
                    means = self.accelerator.reduce(means, reduction="mean")
                logs = {**logs, **{prefix + k: round(float(v), 4) for k, v in zip(names, means.tolist())}}
            return super().log(logs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.preference is not None:
                with autocast_context(model, self.autocast_dtype, self._tuner_layers()):
                    loss = self._pair_step(model, inputs, "train")
                return (loss, {"loss": loss}) if return_outputs else loss
            inputs = self._model_inputs(inputs)  # here, not in training_step: callbacks see the batch as made
            with autocast_context(model, self.autocast_dtype, self._tuner_layers()):
                if not self.chunked:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                # Same normalisation as the model's own loss: per-batch mean, or the token sum over the
                # accumulated batch when the Trainer passes num_items_in_batch (gradient accumulation).
                items = num_items_in_batch if self.model_accepts_loss_kwargs else None
                loss = causal_lm_chunked_loss(model, inputs, self.chunk_rows, items, self._loss_workspace)
            return (loss, {"loss": loss}) if return_outputs else loss

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            # the loss it reports (logged, so the eval curve; on_evaluate, so keep_best and early stopping; the
            # run's summary) is the loss summed over every loss-bearing token of the eval set / their count
            self._eval_sums = []
            counting = getattr(self.data_collator, "counting", None)
            if counting is not None:  # eval batches are no training tokens (core.training.CountingCollator)
                self.data_collator.counting = False
            try:
                output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                                 metric_key_prefix)
                sums = self._eval_sums
            finally:
                self._eval_sums = None
                if counting is not None:
                    self.data_collator.counting = counting
            if sums:
                # every process's batches (under several processes the eval set is padded with rows that carry no
                # loss, train.padded_for_processes, so the rows the dataloader repeats to even them out add nothing)
                total, count = self.accelerator.reduce(torch.stack(sums).sum(0), reduction="sum").tolist()
                if count > 0:
                    output.metrics[f"{metric_key_prefix}_loss"] = total / count
            return output

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)  # on the device first: the attention choice reads it
            with autocast_context(model, self.autocast_dtype, self._tuner_layers()), self._attention(inputs, model):
                if self.preference is not None:
                    with torch.no_grad():
                        return self._pair_step(model, inputs, "eval").detach(), None, None
                if not prediction_loss_only or "labels" not in inputs:  # logits wanted: the Trainer's own step
                    self._eval_sums = None  # and its loss
                    return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
                with torch.no_grad():
                    total, count = summed_loss(model, self._model_inputs(inputs), self.chunked, self.chunk_rows,
                                               self._loss_workspace)
            if self._eval_sums is not None:  # read back once, when the evaluation ends (no host sync per batch)
                self._eval_sums.append(torch.stack([total.detach().double(), count.double()]))
            return (total / count.clamp(min=1)).detach(), None, None

    return SpeedTrainer


def drop_optimizer_state(trainer) -> None:
    """Free the optimizer's per-parameter state (AdamW's two moments: two fp32 copies of the adapter).

    For a run that has completed, before its final evaluation: no step follows, and the evaluation's
    buffers then fit where the moments were instead of growing the process (on the CPU a freed block stays
    in the heap for reuse)."""
    opt = getattr(trainer, "optimizer", None)
    state = getattr(getattr(opt, "optimizer", opt), "state", None)  # accelerate wraps the optimizer
    if state is not None:
        state.clear()


def holding_loss_blocks(trainer):
    """A context that keeps ``trainer``'s chunked-loss workspace across the calls inside it (nothing for a
    plain ``transformers.Trainer``)."""
    hold = getattr(trainer, "loss_blocks", None)
    return hold() if hold is not None else contextlib.nullcontext()


def schedule_as_set(note: Optional[Callable[[str], None]] = None):
    """A callback that makes the learning-rate schedule the one the settings give, from the first step.

    - transformers' warm-up multiplies the learning rate by step / warmup_steps, so step 0 runs at a learning
      rate of 0: one wasted step in every run, and the whole run when it is a one-step smoke test (any run
      under 34 steps gets exactly one warm-up step at the default 3%). Shifted by one, the warm-up rises
      1/w, 2/w, ..., 1 and every step trains; the schedule after the warm-up is unchanged.
    - A resumed run loads the checkpoint's scheduler, whose base learning rate is the interrupted run's, and the
      optimizer's, whose current rate is the old schedule's: a learning_rate changed on --resume was ignored
      while the record showed the new one, and a changed max_steps took effect one step late. The base rate
      is set to ``args.learning_rate`` and the current rate recomputed from the schedule at the resumed step.
      Where that moves the next step's rate away from the interrupted run's, ``note`` is told both figures (a
      larger learning_rate on --resume near the end of a cosine schedule still gives a small rate).
    """
    from transformers import TrainerCallback

    class ScheduleAsSet(TrainerCallback):
        def __init__(self):
            # which schedulers were set (not a mark on the scheduler: its state_dict saves every attribute, so a
            # resumed run's scheduler came back marked, and neither the warm-up shift nor the new rate applied)
            self.done = set()

        def on_train_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
            sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
            lambdas = getattr(sched, "lr_lambdas", None)
            if not lambdas or optimizer is None or id(sched) in self.done:
                return
            self.done.add(id(sched))
            sched.base_lrs = [args.learning_rate] * len(sched.base_lrs)
            for group in optimizer.param_groups:
                group["initial_lr"] = args.learning_rate
            w = args.get_warmup_steps(state.max_steps)
            if w >= 1:
                sched.lr_lambdas = [(lambda step, f=f: f(step + 1) if step < w else f(step)) for f in lambdas]
            was = optimizer.param_groups[0]["lr"]  # a resumed run's: the interrupted schedule's next rate
            for group, base, f in zip(optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * f(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in optimizer.param_groups]
            now = optimizer.param_groups[0]["lr"]
            if note is not None and state.global_step > 0 and abs(now - was) > 0.01 * max(abs(was), 1e-12):
                kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
                note(f"step {state.global_step + 1} trains at a learning rate of {now:.3g}, where the interrupted "
                     f"run's would have been {was:.3g}: the {kind} schedule is laid from learning_rate "
                     f"{args.learning_rate:g} over this run's {state.max_steps} steps and continues at step "
                     f"{state.global_step}.")

    return ScheduleAsSet()


def _sagemaker_mp() -> bool:
    try:
        from transformers.utils import is_sagemaker_mp_enabled
    except ImportError:
        return False
    return bool(is_sagemaker_mp_enabled())


def make_trainer(model, chunked_loss: bool, chunk_rows: int = 0, notes: Optional[list] = None,
                 autocast_dtype=None, lean_steps: bool = False, causal_mask_only: bool = False,
                 preference: Optional[tuple] = None, **trainer_kw):
    """A Trainer for ``model``: the chunked loss when asked for and the model allows it; the forward under
    autocast when ``autocast_dtype`` is bf16/fp16; the per-step bookkeeping over lists made once when
    ``lean_steps``; right-padded batches without their padding mask when ``causal_mask_only``; the loss of
    ``preference = (objective, beta, gamma)`` over batches of pairs (core.preference); the plain
    ``transformers.Trainer`` when none applies and there is no eval set (an evaluation's loss is token-weighted,
    as ``%lora_eval``'s)."""
    import torch
    from transformers import Trainer

    if chunked_loss:
        why = chunked_loss_blocker(model)
        if why is not None:
            chunked_loss = False
            msg = f"chunked loss off: {why}; using the standard full-logits loss"
            log.info(msg)
            if notes is not None:
                notes.append(msg)
    if autocast_dtype not in (torch.bfloat16, torch.float16):
        autocast_dtype = None
    plain = not chunked_loss and autocast_dtype is None and not lean_steps and not causal_mask_only and preference is None
    if plain and trainer_kw.get("eval_dataset") is None:
        return Trainer(model=model, **trainer_kw)
    trainer = speed_trainer_class()(model=model, **trainer_kw)
    trainer.own_attention = not plain  # every lever off: SpeedTrainer only for its token-weighted eval loss
    trainer.chunked = chunked_loss
    trainer.chunk_rows = int(chunk_rows or 0)
    trainer.autocast_dtype = autocast_dtype
    trainer.lean_steps = bool(lean_steps)
    trainer.causal_mask_only = bool(causal_mask_only)
    if preference is not None:
        trainer.preference = tuple(preference)
        trainer._pair_metrics = {}
        trainer.loss_is_scaled_for_ga = False  # a mean over the batch's pairs: the Trainer divides by grad_accum
    return trainer
