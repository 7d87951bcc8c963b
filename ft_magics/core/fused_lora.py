"""One autograd node per LoRA layer while training: the base matmul and the low-rank update, fused.

PEFT computes a LoRA layer as ``base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: besides the
matmuls that is a clone, a scaling pass and an addition over the whole output in the forward, a scaling
pass over the output's gradient and an addition of the two input gradients in the backward, and one
autograd node per op. On a small model those passes over activation-sized tensors cost as much as the
matmuls they surround (measured on the demo model, batch 8 x ~75 tokens on 2 cores: a scalar multiply of
an 8 x 75 x 1536 bf16 tensor takes 0.3 ms inside a training step, a third of the base matmul it follows).

:class:`LoraLinearFn` does the same arithmetic with none of those passes::

    y  = x W^T (+ bias);  xa = dropout(x) A^T;  y += scaling * xa B^T         (addmm, in place)
    backward:  g = scaling * dy B;  dA = g^T dropout(x);  dB = scaling * dy^T xa;  dx = dy W (+ g A)

keeping what PEFT keeps (the LoRA input and ``xa``; the base weight is re-dequantised in the backward,
as bitsandbytes does). The weight is the bitsandbytes 4-bit weight dequantised to the compute dtype, or
a plain ``nn.Linear`` weight. Only vanilla LoRA with one active adapter under autocast (or with every
dtype already equal) is switched; a DoRA adapter gets a node of its own (:func:`_dora_function`: the norm
of ``W + s B A`` detached, as PEFT has it, and the undivided output kept for the magnitude's gradient); other
variants, LoRA bias, mixed adapter batches, merged or disabled adapters, trainable base weights and
inference-packed 4-bit weights run PEFT's own forward.
Without autograd (generation, evaluation: :mod:`ft_magics.core.inference` and ``evaluation`` switch it on
too) the base layer's own forward runs (bitsandbytes' inference kernels) and the update is added in the
adapter's dtype, as PEFT does, in four ops instead of PEFT's dozen (:func:`_inference_forward`); a DoRA
layer computes its weight norm once and keeps it until the adapter changes (:func:`_dora_inference_forward`),
reading a 4-bit weight right also once bitsandbytes has repacked it (:func:`true_weight`). In the
compute dtype it would be slower: a bf16 matmul of one row costs 29 us here against 9 us in fp32.
The switch lasts for a ``with`` block, like :func:`ft_magics.core.lean.lean_activations`.
"""
from __future__ import annotations

import functools
from typing import Optional

from .lean import switched_forwards
from .training import cpu_packed


def _lora_forward(x2, xd2, weight_of, bias, A, B, scaling, dtype):
    """``(y, xa, a, b)``: ``x2 W^T + bias + scaling * xd2 A^T B^T`` (2-D inputs) with the scaling and sum folded
    into one addmm, ``xa = xd2 A^T`` and the adapter's matrices in ``dtype``: what a fused node keeps besides
    its input."""
    import torch

    w = weight_of(dtype)
    y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
    a, b = A.to(dtype), B.to(dtype)
    xa = xd2 @ a.t()
    y.addmm_(xa, b.t(), alpha=scaling)
    return y, xa, a, b


def _lora_grad_b(dy2, xa, scaling, dtype):
    """The gradient of B: ``scaling * dy^T xa``, in B's own dtype."""
    return (dy2.t() @ xa).mul_(scaling).to(dtype)


@functools.cache
def _function():
    import torch

    class LoraLinearFn(torch.autograd.Function):
        """``x W^T + bias + scaling * dropout(x) A^T B^T`` with the scaling and sum folded into one addmm."""

        @staticmethod
        def forward(ctx, x, xd, A, B, bias, weight_of, scaling, dtype):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            xd2 = x2 if xd is None else xd.reshape(-1, shape[-1]).to(dtype)
            y, xa, a, b = _lora_forward(x2, xd2, weight_of, bias, A, B, scaling, dtype)
            ctx.save_for_backward(xd2, xa, a, b)
            ctx.weight_of, ctx.scaling, ctx.shape, ctx.x_dtype = weight_of, scaling, shape, x.dtype
            ctx.xd_dtype = None if xd is None else xd.dtype
            ctx.ab_dtypes = (A.dtype, B.dtype)  # the adapter's own dtype (fp32 unless it was made otherwise)
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            xd2, xa, a, b = ctx.saved_tensors
            want_x, want_xd, want_a, want_b = ctx.needs_input_grad[:4]
            dy2 = dy.reshape(-1, dy.shape[-1]).to(xa.dtype)
            g = (dy2 @ b).mul_(ctx.scaling) if (want_a or want_x or want_xd) else None
            da = (g.t() @ xd2).to(ctx.ab_dtypes[0]) if want_a else None
            db = _lora_grad_b(dy2, xa, ctx.scaling, ctx.ab_dtypes[1]) if want_b else None
            dx = dxd = None
            shape = ctx.shape
            if want_x:
                dx = dy2 @ ctx.weight_of(dy2.dtype)
                if ctx.xd_dtype is None:  # no dropout: both branches read x
                    dx.addmm_(g, a)
                dx = dx.view(shape).to(ctx.x_dtype)
            if want_xd:
                dxd = (g @ a).view(shape).to(ctx.xd_dtype)
            return dx, dxd, da, db, None, None, None, None

    return LoraLinearFn


@functools.cache
def _silu_mul_function():
    import torch
    import torch.nn.functional as F

    class SiluMulLoraFn(torch.autograd.Function):
        """A SwiGLU MLP's ``down(silu(g) * u)`` with ``down`` a LoRA layer, as one node that keeps ``g`` and ``u``
        (which the SiLU's backward needs anyway) and not the product ``h = silu(g) * u``: the backward
        recomputes ``h`` (one elementwise product more; the SiLU it computes once either way). The arithmetic
        is :class:`LoraLinearFn`'s on ``h`` and the lean SiLU product's, op for op."""

        @staticmethod
        def forward(ctx, g, u, A, B, bias, weight_of, scaling, dtype):
            shape = g.shape
            h2 = F.silu(g).mul_(u).reshape(-1, shape[-1]).to(dtype)
            y, xa, a, b = _lora_forward(h2, h2, weight_of, bias, A, B, scaling, dtype)
            ctx.save_for_backward(g, u, xa, a, b)
            ctx.weight_of, ctx.scaling, ctx.dtype = weight_of, scaling, dtype
            ctx.ab_dtypes = (A.dtype, B.dtype)
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            g, u, xa, a, b = ctx.saved_tensors
            want_g, want_u, want_a, want_b = ctx.needs_input_grad[:4]
            dy2 = dy.reshape(-1, dy.shape[-1]).to(xa.dtype)
            gl = (dy2 @ b).mul_(ctx.scaling)
            s = F.silu(g)
            da = None
            if want_a:
                h2 = (s * u).reshape(-1, g.shape[-1]).to(ctx.dtype)
                da = (gl.t() @ h2).to(ctx.ab_dtypes[0])
                del h2
            db = _lora_grad_b(dy2, xa, ctx.scaling, ctx.ab_dtypes[1]) if want_b else None
            dg = du = None
            if want_g or want_u:
                dh = (dy2 @ ctx.weight_of(dy2.dtype)).addmm_(gl, a).view(g.shape).to(g.dtype)
                du = s.mul_(dh) if want_u else None
                if want_g:
                    dh_u = dh.mul_(u)
                    dg = torch.ops.aten.silu_backward.grad_input(dh_u, g, grad_input=dh_u)  # in place
            return dg, du, da, db, None, None, None, None

    return SiluMulLoraFn


def silu_mul_down(down, g, u):
    """``down(silu(g) * u)`` as one :func:`_silu_mul_function` node, or None where ``down`` runs otherwise: not
    switched by a :func:`fused_lora` block, no autograd, or its forward would not be the fused LoRA node (see
    :func:`_fused_forward`), or LoRA dropout (its mask would have to be kept)."""
    import torch

    fn = getattr(vars(down).get("forward"), "__func__", None)
    if not (isinstance(fn, functools.partial) and fn.func is _fused_forward) or not torch.is_grad_enabled():
        return None
    parts = fn.keywords["parts"]
    active = _active_parts(down, parts)
    if active is None or active[1] is None:
        return None
    base, A, B, dropout, scaling = active[1]
    if not isinstance(dropout, torch.nn.Identity) or g.dtype != u.dtype:
        return None
    how = _training_weight(g, base, A.dtype, parts)
    if how is None:
        return None
    return _silu_mul_function().apply(g, u, A, B, base.bias, how[1], scaling, how[0])


@functools.cache
def _dora_function():
    import torch

    class DoraLinearFn(torch.autograd.Function):
        """DoRA's ``m / ||W + s B A|| * (x W^T + s x A^T B^T) + bias`` (the norm detached, as PEFT and the paper
        have it) as one node: keeps the input, ``x A^T``, the undivided output ``z`` and the scale."""

        @staticmethod
        def forward(ctx, x, A, B, magnitude, bias, weight_of, scaling, dtype):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w = weight_of(dtype)
            a, b = A.to(dtype), B.to(dtype)
            norm = torch.linalg.vector_norm(torch.addmm(w, b, a, alpha=scaling), dim=1, dtype=torch.float32)
            scale = magnitude.float() / norm  # per output row
            z = x2 @ w.t()
            xa = x2 @ a.t()
            z.addmm_(xa, b.t(), alpha=scaling)
            y = torch.mul(z, scale).to(dtype)
            if bias is not None:
                y += bias.to(dtype)
            ctx.save_for_backward(x2, xa, a, b, z, scale, norm)
            ctx.weight_of, ctx.scaling, ctx.shape, ctx.x_dtype = weight_of, scaling, shape, x.dtype
            ctx.dtypes = (A.dtype, B.dtype, magnitude.dtype)
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            x2, xa, a, b, z, scale, norm = ctx.saved_tensors
            want_x, want_a, want_b, want_m = ctx.needs_input_grad[:4]
            dy2 = dy.reshape(-1, dy.shape[-1])
            dm = (dy2.float() * z).sum(0).div_(norm).to(ctx.dtypes[2]) if want_m else None
            dz = torch.mul(dy2, scale).to(xa.dtype)
            g = (dz @ b).mul_(ctx.scaling) if (want_a or want_x) else None
            da = (g.t() @ x2).to(ctx.dtypes[0]) if want_a else None
            db = (dz.t() @ xa).mul_(ctx.scaling).to(ctx.dtypes[1]) if want_b else None
            dx = None
            if want_x:
                dx = (dz @ ctx.weight_of(dz.dtype)).addmm_(g, a).view(ctx.shape).to(ctx.x_dtype)
            return dx, da, db, dm, None, None, None, None

    return DoraLinearFn


def _weight_reader(base, kept: Optional[dict] = None):
    """``dtype -> (out, in) weight`` for a frozen base layer this module fuses, or None. ``kept`` (a dict that
    lives as long as the ``with fused_lora`` block) keeps a double-quantised 4-bit weight's absmax dequantised,
    see :func:`kept_absmax`."""
    import torch

    weight = getattr(base, "weight", None)
    bias = getattr(base, "bias", None)
    if weight is None or weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if type(base) is torch.nn.Linear:
        return lambda dtype: weight.to(dtype)
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        absmax = kept_absmax(base.weight.quant_state, kept)
        return lambda dtype: dequantize_4bit_direct(base.weight.data, base.weight.quant_state, absmax).to(dtype)
    return None


def kept_absmax(qs, kept: Optional[dict]):
    """The fp32 absmax of double-quantised state ``qs``, dequantised once and kept in ``kept``; None without
    ``kept`` or double quantisation (each dequantisation then reads it afresh).

    Double quantisation stores the 4-bit blocks' absmax values 8-bit quantised themselves, and every
    dequantisation of the weight first dequantised them: a kernel call per weight, two per layer and step
    (three with gradient checkpointing), for values that do not change while the base is frozen. Kept in fp32
    for a training run they cost 4 bytes per 64 weights (6.6 MB on the demo model) and save that kernel:
    measured on the demo model (2 cores, batch 8), dequantize_blockwise was 1.6% of a training step."""
    if kept is None or qs is None or not qs.nested:
        return None
    held = kept.get(_ABSMAX)
    if held is None or held[0] is not qs:
        held = kept[_ABSMAX] = (qs, _dequantized_absmax(qs))
    return held[1]


_ABSMAX = ("kept", "absmax")  # its key in a layer's ``parts`` (whose other keys are adapter names: strings)


def _dequantized_absmax(qs):
    import torch

    s2 = qs.state2
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(qs.absmax, s2.absmax, s2.code.to(qs.absmax.device),
                                                                 s2.blocksize, s2.dtype)
    absmax += qs.offset
    return absmax.float()


def dequantize_4bit_direct(A, qs, absmax=None):
    """``bitsandbytes.functional.dequantize_4bit(A, qs)``, bit for bit, calling the two kernels directly.

    The functional wrapper validates its arguments and builds state objects on every call: on the demo
    model that was more than the kernels themselves (2 cores, the 7 weights of one layer: 0.57-0.70 ms
    against 0.31 ms), twice per layer per training step (forward and backward). ``absmax``: the state's absmax
    already dequantised (:func:`kept_absmax`)."""
    import torch

    ops = torch.ops.bitsandbytes
    if absmax is None:
        # double quantisation: the absmax values are themselves 8-bit blockwise-quantised
        absmax = _dequantized_absmax(qs) if qs.nested else qs.absmax
    if absmax.dtype != torch.float32:
        absmax = absmax.float()
    out = ops.dequantize_4bit.default(A, absmax, qs.blocksize, qs.quant_type, qs.shape, qs.dtype)
    return out.t() if A.shape[0] == 1 else out  # bitsandbytes' transposed-input convention


def true_weight(base):
    """The (out, in) weight of a plain or bitsandbytes 4-bit linear layer, also once bitsandbytes has repacked
    it for its CPU inference kernel.

    PEFT's ``dequantize_module_weight`` reads a repacked weight as if it were in the standard layout: on the
    demo model the result is off by up to 5.8 where the weights are below 1, so every DoRA forward that
    needs the weight (PEFT's, in each generated token) computed its norm from garbage. The repacked
    weight is read through the copy :func:`ft_magics.core.training.remember_unpacked_4bit` kept, else
    through bitsandbytes' inverse conversion (on a copy of the quant state, which it rewrites).
    """
    import copy

    qs = getattr(base.weight, "quant_state", None)
    if qs is None:
        return base.weight
    data = base.weight.data
    if cpu_packed(qs):
        kept = getattr(base, "_ft_unpacked", None)
        if kept is not None:
            data, qs = kept
        else:
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, qs = _convert_weight_packed_for_cpu_inverse(data, copy.copy(qs))
    return dequantize_4bit_direct(data, qs)


_PEFT_READERS = ("peft.tuners.lora.dora", "peft.tuners.lora.layer", "peft.tuners.lora.variants")


def read_packed_weights_in_peft() -> int:
    """Make PEFT's own ``dequantize_module_weight`` read a 4-bit weight through :func:`true_weight` once
    bitsandbytes has repacked it for its CPU kernel; return how many of PEFT's modules were switched.

    The fused paths already read it right, but PEFT's forward still runs where a user calls
    ``model.generate`` on the session's model, where DoRA trains with dropout, and where PEFT builds DoRA
    magnitudes or delta weights; on a repacked weight all of those computed from garbage. Only weights in
    that layout take the new reader (PEFT's result there is never right), so this is safe process-wide; it is
    installed once, when a 4-bit model is loaded on the CPU."""
    import importlib

    switched = 0
    for name in _PEFT_READERS:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        original = getattr(mod, "dequantize_module_weight", None)
        if original is None or getattr(original, "_ft_packed_aware", False):
            continue

        def dequantize_module_weight(module, _original=original):
            if cpu_packed(getattr(getattr(module, "weight", None), "quant_state", None)):
                return true_weight(module)
            return _original(module)

        dequantize_module_weight._ft_packed_aware = True
        mod.dequantize_module_weight = dequantize_module_weight
        switched += 1
    return switched


def _compute_dtype(x, base, a_dtype):
    """The dtype the fused layer computes in, or None where PEFT's own path must run (its precisions)."""
    import torch

    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    base_dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
    if x.dtype == a_dtype == base_dtype:  # all one dtype (e.g. fp32 on a CPU without fast bf16)
        return x.dtype
    return None


def _layer_parts(self, name):
    """``(base layer, A, B, dropout, scaling)`` of adapter ``name`` of LoRA layer ``self``, or None where
    PEFT's own forward must run for it (a variant such as DoRA, or a bias on B)."""
    if name in self.lora_variant or getattr(self.lora_B[name], "bias", None) is not None:
        return None
    return (self.get_base_layer(), self.lora_A[name].weight, self.lora_B[name].weight, self.lora_dropout[name],
            float(self.scaling[name]))


def _active_parts(self, parts: dict):
    """``(name, parts)`` of the one active adapter of LoRA layer ``self`` (``parts``: :func:`_layer_parts`, None for
    a variant, cached in the block's dict ``parts``), or None where PEFT's own forward runs whatever the adapter:
    adapters disabled or merged, or several active."""
    if self.disable_adapters or self.merged:
        return None
    active = self.active_adapters
    if len(active) != 1 or active[0] not in self.lora_A:
        return None
    name = active[0]
    if name not in parts:
        parts[name] = _layer_parts(self, name)
    return name, parts[name]


def _fused_forward(self, x, *args, parts=None, **kwargs):
    """The switched forward. ``parts`` caches :func:`_layer_parts` per adapter name for the ``with`` block
    (nn.Module attribute lookups were a third of this function's time per generated token)."""
    cls_forward = type(self).forward
    active = None if args or kwargs else _active_parts(self, {} if parts is None else parts)
    if active is None:
        return cls_forward(self, x, *args, **kwargs)
    import torch

    name, layer = active
    if layer is None:
        if name in self.lora_variant:
            dora = _dora_inference_forward if not torch.is_grad_enabled() else _dora_training_forward
            out = dora(self, x, name)
            if out is not None:
                return out
        return cls_forward(self, x, *args, **kwargs)
    base, A, B, dropout, scaling = layer

    if not torch.is_grad_enabled():  # generation and evaluation
        return _inference_forward(self, x, base, A, B, dropout, scaling)
    how = _training_weight(x, base, A.dtype, parts)
    if how is None:
        return cls_forward(self, x, *args, **kwargs)
    xd = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    return _function().apply(x, xd, A, B, base.bias, how[1], scaling, how[0])


def _training_weight(x, base, adapter_dtype, kept: Optional[dict] = None):
    """``(compute dtype, weight reader)`` for a fused node over ``base`` while training, or None where PEFT's
    forward must run (a 4-bit weight in the inference layout, a base this module cannot read, dtypes without
    autocast that differ). Readies a 4-bit weight's quant state as bitsandbytes' own forward does. ``kept``:
    see :func:`_weight_reader`."""
    qs = getattr(base.weight, "quant_state", None)
    if cpu_packed(qs):
        return None
    dtype = _compute_dtype(x, base, adapter_dtype)
    if qs is not None:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
    reader = _weight_reader(base, kept)
    if dtype is None or reader is None:
        return None
    return dtype, reader


def _inference_forward(self, x, base, A, B, dropout, scaling):
    """Without autograd: the base layer's own forward (bitsandbytes' inference kernels) plus the update in
    the adapter's dtype, as PEFT computes it, but in four ops where PEFT's takes a clone, two casts, two
    module calls, a scaling pass and a sum. At one token per step those calls are most of what an unmerged
    adapter costs (demo model, 2 cores: 17 instead of 32 us per layer over the base's kernel). Dropout
    that is active (a module left in training mode) and autocast keep PEFT's forward."""
    import torch

    if (self.training and not isinstance(dropout, torch.nn.Identity)) or torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x)
    return base(x).add_((x.to(A.dtype) @ A.t()) @ B.t(), alpha=scaling)


def _dora_scale(self, name, A, B, magnitude, scaling):
    """DoRA's per-output scale ``magnitude / ||W + scaling * B A||`` (rows), as PEFT computes it, kept on the
    layer until the adapter's weights change (or are replaced: their tensor versions and identities are the key).

    PEFT recomputes it in every forward: it dequantises the whole base weight and forms ``B A`` for each
    generated token. Its own cache (``peft.helpers.DoraCaching``) would also keep ``B A``, a full-size matrix
    per layer: the size of the model again, in fp32. This keeps one vector per layer.
    """
    import weakref

    cache = vars(self).setdefault("_ft_dora_scale", {})
    hit = cache.get(name)
    if hit is not None and all(ref() is t and v == t._version for (ref, v), t in zip(hit[0], (A, B, magnitude))):
        return hit[1]
    key = tuple((weakref.ref(t), t._version) for t in (A, B, magnitude))
    for gone in [n for n, (k, _) in cache.items() if any(ref() is None for ref, _ in k)]:
        del cache[gone]  # adapters dropped since: their tensors are gone
    dora = self.lora_magnitude_vector[name]
    weight = true_weight(self.get_base_layer()).to(A.dtype)
    norm = dora.get_weight_norm(weight, (B @ A).detach(), scaling)  # no adapter_name: PEFT's cache stays off
    scale = (magnitude / norm.detach()).view(1, -1)
    cache[name] = (key, scale)
    return scale


def _dora_layer(self, name):
    """The magnitude module of DoRA adapter ``name`` of LoRA layer ``self`` where this module computes it, else
    None (PEFT's own forward: dropout in training mode, a LoRA bias, a transposed base weight)."""
    import torch

    mags = getattr(self, "lora_magnitude_vector", None)
    if not getattr(self, "use_dora", {}).get(name) or mags is None or name not in mags:
        return None
    if (getattr(self, "fan_in_fan_out", False) or getattr(self.lora_B[name], "bias", None) is not None
            or (self.training and not isinstance(self.lora_dropout[name], torch.nn.Identity))):
        return None
    return mags[name]


def _dora_training_forward(self, x, name):
    """A DoRA layer while autograd records: one :func:`_dora_function` node (PEFT's takes a dozen, keeps more,
    and returns fp32 under autocast); None where PEFT's forward must run (:func:`_dora_layer`,
    :func:`_training_weight`)."""
    dora = _dora_layer(self, name)
    if dora is None:
        return None
    base = self.get_base_layer()
    A, B = self.lora_A[name].weight, self.lora_B[name].weight
    how = _training_weight(x, base, A.dtype)
    if how is None:
        return None
    return _dora_function().apply(x, A, B, dora.weight, base.bias, how[1], float(self.scaling[name]), how[0])


def _dora_inference_forward(self, x, name):
    """A DoRA layer without autograd, PEFT's arithmetic with the weight norm kept (:func:`_dora_scale`); None
    where PEFT's own forward must run (autocast, a base :func:`true_weight` cannot read, :func:`_dora_layer`)."""
    import torch

    dora = _dora_layer(self, name)
    base = self.get_base_layer()
    if dora is None or torch.is_autocast_enabled(x.device.type) or _weight_reader(base) is None:
        return None
    A, B, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    scale = _dora_scale(self, name, A, B, dora.weight, scaling)
    result = base(x)
    xa = x.to(A.dtype)
    lora = (xa @ A.t()) @ B.t()
    base_result = result if base.bias is None else result - base.bias
    return (result + ((scale - 1) * base_result + scale * lora * scaling)).to(result.dtype)


def fusable_layers(model):
    """The PEFT LoRA layers of ``model`` whose base layer this module can fuse with (whatever the adapter state)."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")
            and _weight_reader(m.get_base_layer()) is not None]


def fused_lora(model, enabled: bool = True):
    """Inside the block, LoRA layers of ``model`` run as one fused autograd node each (see the module doc)."""
    return switched_forwards(((mod, functools.partial(_fused_forward, parts={})) for mod in fusable_layers(model))
                             if enabled else ())
