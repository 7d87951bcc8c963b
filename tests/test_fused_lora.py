"""core.fused_lora: one autograd node per LoRA layer, the same loss and gradients as PEFT's layers.

That training switches it on by default (and `fused_lora: false` off) is checked beside lean_activations, in
tests/test_lean.py.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _tiny(dtype=torch.float32, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(cfg).to(dtype)


def _4bit_base(tiny_model_dir, device):
    """The tiny model in NF4 4-bit (bitsandbytes), bf16 compute, on ``device``."""
    from transformers import AutoModelForCausalLM

    from ft_magics.core.loading import quantization_config

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16, device_map={"": device},
                                                quantization_config=quantization_config(4, torch.bfloat16))


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    cfg.update(kw)
    pm = get_peft_model(model, LoraConfig(**cfg))
    torch.manual_seed(2)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # B starts at zero: give it values so that every LoRA gradient is non-trivial
            torch.nn.init.normal_(p, std=0.05)
    return pm


def _step(model, fused: bool, autocast=None):
    """Loss and every trainable gradient of one forward + backward, with the layers fused or not."""
    from ft_magics.core.fused_lora import fused_lora
    from ft_magics.core.speed import autocast_context

    torch.manual_seed(1)
    ids = torch.randint(0, 96, (3, 24)).to(next(model.parameters()).device)
    model.zero_grad(set_to_none=True)
    with fused_lora(model, fused) as n:
        with autocast_context(model, autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, n


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "biased-base"])  # Qwen2-style q/k/v biases
def test_same_loss_and_gradients_as_peft_layers(bias):
    pm = _lora(_tiny(bias=bias))
    if bias:
        for n, p in pm.named_parameters():
            if n.endswith("base_layer.bias"):
                torch.nn.init.normal_(p, std=0.1)
    loss0, g0, n0 = _step(pm, False)
    loss1, g1, n1 = _step(pm, True)
    assert n0 == 0 and n1 == 14  # 7 linear layers per block, 2 blocks
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 28  # lora_A and lora_B of every layer
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-7), k


def _dora(model):
    pm = _lora(model, use_dora=True)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))  # a magnitude apart from the norm: DoRA's scale is not 1
    return pm


def _counting_dora(calls):
    from ft_magics.core import fused_lora as fl

    fn = fl._dora_function()
    real = fn.apply
    fn.apply = lambda *a: (calls.append(1), real(*a))[1]
    return lambda: setattr(fn, "apply", real)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "biased-base"])
def test_dora_trains_as_peft_s_layers_in_one_node(bias):
    """DoRA ran PEFT's own forward while training (demo model: 195 instead of 314 loss tokens/s, 2.0 instead of
    1.4 GB). The fused DoRA node gives PEFT's loss and gradients, the magnitudes' included."""
    pm = _dora(_tiny(bias=bias))
    if bias:
        for n, p in pm.named_parameters():
            if n.endswith("base_layer.bias"):
                torch.nn.init.normal_(p, std=0.1)
    calls = []
    undo = _counting_dora(calls)
    try:
        loss0, g0, _ = _step(pm, False)
        assert calls == []
        loss1, g1, _ = _step(pm, True)
    finally:
        undo()
    assert len(calls) == 14
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 42  # lora_A, lora_B and the magnitude of every layer
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-7), k


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dora_on_a_4bit_base_under_bf16_autocast_agrees_within_bf16_rounding(tiny_model_dir, device):
    base = _4bit_base(tiny_model_dir, device)
    pm = _dora(base)
    calls = []
    undo = _counting_dora(calls)
    try:
        loss0, g0, _ = _step(pm, False, torch.bfloat16)
        loss1, g1, _ = _step(pm, True, torch.bfloat16)
    finally:
        undo()
    assert calls and abs(float(loss0) - float(loss1)) < 1e-2
    assert all(g.dtype == torch.float32 for g in g1.values())
    for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
        flat0 = torch.cat([g.flatten() for k, g in g0.items() if part in k])
        flat1 = torch.cat([g1[k].flatten() for k in g0 if part in k])
        assert float((flat0 - flat1).norm() / flat0.norm()) < 2e-2, part


def test_dropout_draws_the_same_mask():
    pm = _lora(_tiny(), lora_dropout=0.3)
    pm.train()
    loss0, g0, _ = _step(pm, False)
    loss1, g1, _ = _step(pm, True)
    assert torch.allclose(loss0, loss1, atol=1e-6)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-7), k


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_4bit_base_under_bf16_autocast_agrees_within_bf16_rounding(tiny_model_dir, device):
    base = _4bit_base(tiny_model_dir, device)
    pm = _lora(base)
    loss0, g0, _ = _step(pm, False, torch.bfloat16)
    loss1, g1, n = _step(pm, True, torch.bfloat16)
    assert n > 0 and all(type(m.get_base_layer()).__name__ == "Linear4bit"
                         for m in __import__("ft_magics.core.fused_lora", fromlist=["x"]).fusable_layers(pm))
    assert abs(float(loss0) - float(loss1)) < 1e-2
    assert all(g.dtype == torch.float32 for g in g1.values())  # the adapter (and AdamW) stay fp32
    flat0 = torch.cat([g.flatten() for g in g0.values()])
    flat1 = torch.cat([g1[k].flatten() for k in g0])
    assert float((flat0 - flat1).norm() / flat0.norm()) < 2e-2


def test_other_states_and_variants_run_pefts_own_forward():
    from ft_magics.core import fused_lora as fl

    calls = []
    fn = fl._function()
    real_apply = fn.apply

    def counting_apply(*a):
        calls.append(1)
        return real_apply(*a)

    ids = torch.randint(0, 96, (2, 10))
    for kw, state in (({}, "merged"), ({}, "disabled"), ({"use_dora": True}, None)):
        pm = _lora(_tiny(), **kw)
        if state == "merged":
            pm.merge_adapter()
        with torch.no_grad():
            want = pm(input_ids=ids).logits if state != "disabled" else None
            if state == "disabled":
                with pm.disable_adapter():
                    want = pm(input_ids=ids).logits
        fn.apply = counting_apply
        try:
            with fl.fused_lora(pm):  # autograd on: where the fused function would otherwise run
                if state == "disabled":
                    with pm.disable_adapter():
                        got = pm(input_ids=ids).logits
                else:
                    got = pm(input_ids=ids).logits
        finally:
            fn.apply = real_apply
        assert torch.allclose(want, got.detach(), atol=1e-5), (kw, state)
    assert calls == []
    # the plain case goes through the fused function while autograd records, and not without it
    pm = _lora(_tiny())
    fn.apply = counting_apply
    try:
        with fl.fused_lora(pm):
            with torch.no_grad():
                pm(input_ids=ids)
            assert calls == []
            pm(input_ids=ids)
    finally:
        fn.apply = real_apply
    assert len(calls) == 14


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base"])
def test_without_autograd_the_update_is_peft_s_in_fewer_ops(dtype):
    """Generation and evaluation (no autograd) take the switched forward: the base layer's own forward
    plus the update in the adapter's (fp32) dtype. Same logits as PEFT's forward (exactly up to rounding in
    fp32; within bf16 rounding on a bf16 base, where it rounds once instead of twice); dropout left active
    in training mode keeps PEFT's forward."""
    from ft_magics.core import fused_lora as fl

    pm = _lora(_tiny(dtype))
    ids = torch.randint(0, 96, (2, 12))
    taken = []
    real = fl._inference_forward

    def counting(self, *a):
        taken.append(1)
        return real(self, *a)

    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids).logits.float()
        fl._inference_forward = counting
        try:
            with fl.fused_lora(pm):
                got = pm(input_ids=ids).logits.float()
        finally:
            fl._inference_forward = real
    assert len(taken) == 14
    scale = want.abs().max()
    assert float((got - want).abs().max() / scale) < (1e-6 if dtype == torch.float32 else 2e-2)

    drop = _lora(_tiny(), lora_dropout=0.5)
    drop.train()  # dropout active without autograd: PEFT's forward (its own random mask)
    with torch.no_grad(), fl.fused_lora(drop):
        torch.manual_seed(4)
        a = drop(input_ids=ids).logits
    with torch.no_grad():
        torch.manual_seed(4)
        b = drop(input_ids=ids).logits
    assert torch.equal(a, b)


def test_generation_with_an_adapter_is_unchanged_by_the_switch(tiny_model_dir):
    """core.inference.generate switches the layers for its duration: greedy tokens as with PEFT's forward."""
    from transformers import AutoTokenizer

    from ft_magics.core import fused_lora as fl
    from ft_magics.core.inference import generate

    from transformers import AutoModelForCausalLM

    pm = _lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    taken = []
    real = fl._inference_forward
    fl._inference_forward = lambda self, *a: (taken.append(1), real(self, *a))[1]
    try:
        got = generate(pm, tok, "hello there", max_new_tokens=6)
    finally:
        fl._inference_forward = real
    n = len(fl.fusable_layers(pm))
    assert n > 0 and len(taken) >= n and len(taken) % n == 0  # every layer, at every generated position
    assert not any("forward" in vars(m) for m in fl.fusable_layers(pm))  # switched back afterwards
    original = fl.fused_lora  # the same generation with PEFT's forward throughout
    fl.fused_lora = lambda model, enabled=True: original(model, False)
    try:
        want = generate(pm, tok, "hello there", max_new_tokens=6)
    finally:
        fl.fused_lora = original
    assert got.text == want.text and got.new_tokens == want.new_tokens


def test_switched_only_inside_the_block():
    from ft_magics.core.fused_lora import fusable_layers, fused_lora

    pm = _lora(_tiny())
    layers = fusable_layers(pm)
    assert len(layers) == 14
    with fused_lora(pm) as n:
        assert n == 14 and all("forward" in vars(m) for m in layers)
        with fused_lora(pm) as inner:  # nested use leaves the outer switch in place
            assert inner == 0
        assert all("forward" in vars(m) for m in layers)
    assert not any("forward" in vars(m) for m in layers)


def test_a_16bit_adapter_gets_gradients_in_its_own_dtype():
    """All one dtype without autocast (a bf16 model with a bf16 adapter): fused, and the adapter's
    gradients come back in bf16, agreeing with PEFT's within bf16 rounding."""
    pm = _lora(_tiny(torch.bfloat16))
    pm.to(torch.bfloat16)
    loss0, g0, _ = _step(pm, False)
    loss1, g1, n = _step(pm, True)
    assert n == 14 and all(g.dtype == torch.bfloat16 for g in g1.values())
    assert abs(float(loss0) - float(loss1)) < 1e-2
    flat0 = torch.cat([g.float().flatten() for g in g0.values()])
    flat1 = torch.cat([g1[k].float().flatten() for k in g0])
    assert float((flat0 - flat1).norm() / flat0.norm()) < 2e-2


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 130), (1, 64), (48, 33)], ids=str)
def test_direct_dequantisation_is_bitsandbytes_bit_for_bit(nested, quant_type, shape):
    """The fused layer's weight reader calls bitsandbytes' two kernels itself; what it returns must equal
    bitsandbytes.functional.dequantize_4bit exactly (double-quantised absmax and its offset included;
    odd widths go through bitsandbytes' generic fallback)."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    from ft_magics.core.fused_lora import dequantize_4bit_direct

    torch.manual_seed(3)
    w = torch.randn(*shape) * 0.05 + 0.01  # a non-zero mean gives the double quantisation a real offset
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested)._quantize("cpu")
    assert p.quant_state.nested is nested
    want = dequantize_4bit(p.data, p.quant_state)
    got = dequantize_4bit_direct(p.data, p.quant_state)
    assert got.shape == want.shape == torch.Size(shape) and got.dtype == want.dtype
    assert torch.equal(got, want)
    assert (got - w.to(got.dtype)).abs().max() < 0.05  # and it is the weight, not merely the same garbage
    from ft_magics.core.fused_lora import kept_absmax

    kept = {}
    absmax = kept_absmax(p.quant_state, kept)
    assert (absmax is None) is (not nested) and kept_absmax(p.quant_state, kept) is absmax
    assert torch.equal(dequantize_4bit_direct(p.data, p.quant_state, absmax), want)  # the kept absmax: the same


def test_a_training_block_dequantises_each_weights_double_quantised_absmax_once(tiny_model_dir, monkeypatch):
    """Every dequantisation of a double-quantised weight first dequantised its 8-bit absmax values again
    (1.6% of a demo-model step); inside one fused block they are dequantised once per weight and kept, with
    the same losses and gradients bit for bit."""
    from ft_magics.core import fused_lora as F

    base = _4bit_base(tiny_model_dir, "cpu")
    pm = _lora(base)
    layers = F.fusable_layers(pm)
    assert layers and all(m.get_base_layer().weight.quant_state.nested for m in layers)
    calls = []
    real = F._dequantized_absmax
    monkeypatch.setattr(F, "_dequantized_absmax", lambda qs: calls.append(qs) or real(qs))
    first = _step(pm, True, torch.bfloat16)  # one block: a forward and a backward through every layer
    assert len(calls) == len(layers) and len({id(q) for q in calls}) == len(layers)
    monkeypatch.setattr(F, "kept_absmax", lambda qs, kept: None)  # afresh every time, as before
    calls.clear()
    again = _step(pm, True, torch.bfloat16)
    assert 1.5 * len(layers) < len(calls) <= 2 * len(layers)  # forward and backward (where x needs a gradient)
    for (l0, g0, _), (l1, g1, _) in [(first, again)]:
        assert torch.equal(l0, l1) and all(torch.equal(g0[k], g1[k]) for k in g0)


def _dora_norms_counted():
    """Patch PEFT's DoRA weight-norm computation to count its calls; returns (calls list, undo)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    calls = []
    real = DoraLinearLayer.get_weight_norm

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    DoraLinearLayer.get_weight_norm = counting
    return calls, lambda: setattr(DoraLinearLayer, "get_weight_norm", real)


def test_dora_without_autograd_is_peft_s_with_the_norm_kept_until_the_adapter_changes():
    """PEFT recomputes DoRA's weight norm (the whole base weight plus B A) in every forward: each generated
    token. The switched forward computes it once per layer and again only when A, B or the magnitude change."""
    from ft_magics.core import fused_lora as fl

    pm = _lora(_tiny(), use_dora=True)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))  # a magnitude that differs from the norm: DoRA's scale is not 1
    pm.eval()
    ids = torch.randint(0, 96, (2, 10))
    layers = len(fl.fusable_layers(pm))
    calls, undo = _dora_norms_counted()
    try:
        with torch.no_grad():
            want = pm(input_ids=ids).logits
            assert len(calls) == layers  # PEFT: once per layer per forward
            calls.clear()
            with fl.fused_lora(pm):
                got = [pm(input_ids=ids).logits for _ in range(3)]
            assert len(calls) == layers  # three forwards, one norm per layer
            assert all(torch.allclose(want, g, atol=1e-5) for g in got)
            a = next(p for n, p in pm.named_parameters() if "lora_A" in n)
            a.add_(0.3)  # the adapter changes (an optimizer step, a hot swap): its layer's norm is stale
            want2 = pm(input_ids=ids).logits
            calls.clear()
            with fl.fused_lora(pm):
                got2 = pm(input_ids=ids).logits
            assert len(calls) == 1 and torch.allclose(want2, got2, atol=1e-5)
            assert not torch.allclose(want, want2, atol=1e-3)
            # an adapter dropped from the model leaves nothing kept for it once another DoRA layer is computed
            from peft import LoraConfig

            pm.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
            pm.set_adapter("second")
            pm.delete_adapter("default")
            with fl.fused_lora(pm):
                pm(input_ids=ids)
            kept = [set(vars(m).get("_ft_dora_scale", {})) for m in fl.fusable_layers(pm)]
            assert kept and all(k == {"second"} for k in kept)
    finally:
        undo()


@pytest.mark.gpu
def test_dora_without_autograd_on_a_4bit_cuda_base_answers_as_peft(tiny_model_dir):
    """On CUDA bitsandbytes keeps the standard 4-bit layout, so PEFT's own DoRA forward is the truth there:
    the switched no-grad forward (true_weight, the kept norm) and batched generation must give its answers."""
    from transformers import AutoTokenizer

    from ft_magics.core import fused_lora as fl
    from ft_magics.core.inference import generate_batch

    base = _4bit_base(tiny_model_dir, "cuda")
    pm = _dora(base)
    pm.eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = tok("Question 3: reset?", return_tensors="pt")["input_ids"].to("cuda")
    calls, undo = _dora_norms_counted()
    try:
        with torch.no_grad():
            want = pm(input_ids=ids).logits
            want_tokens = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
            calls.clear()
            with fl.fused_lora(pm):
                got = [pm(input_ids=ids).logits for _ in range(2)]
            assert len(calls) == len(fl.fusable_layers(pm))  # the norm computed once per layer, then kept
    finally:
        undo()
    assert all((want - g).abs().max() < 0.02 * want.abs().max() for g in got)
    with torch.no_grad(), fl.fused_lora(pm):
        assert torch.equal(pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False), want_tokens)
    assert len(generate_batch(pm, tok, ["hello", "reset?"], max_new_tokens=5)) == 2  # the router's batch path runs


def test_dora_on_a_4bit_base_repacked_for_the_cpu_kernel_answers_as_in_the_standard_layout(tiny_model_dir, tmp_path):
    """After a generate, bitsandbytes has repacked the 4-bit weights for its CPU kernel, and PEFT's DoRA
    dequantised the repacked weight as garbage for its norm. DoRA answers, one or a batch, must be
    those of the standard layout. (PEFT refuses DoRA in mixed-adapter batches; the router groups them instead.)"""
    from ft_magics import Session
    from ft_magics.core import fused_lora as fl
    from ft_magics.core.inference import generate_batch
    from ft_magics.core.training import cpu_packed, training_layout

    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4)
    rows = [{"prompt": f"Question {i}: reset?", "completion": "Category: account"} for i in range(24)]
    for name, lr in (("d1", 5e-3), ("d2", 2e-2)):
        s.train(name, rows, {"max_steps": 4, "batch_size": 4, "learning_rate": lr, "warmup": 0, "use_dora": True},
                listeners=[])
    pm, tok = s.model, s.tokenizer
    ids = tok("Question 3: reset?", return_tensors="pt")["input_ids"]
    pm.set_adapter("d1")
    pm.eval()
    with torch.no_grad(), training_layout(pm):  # the standard layout: PEFT's DoRA reads the weights right
        want = pm(input_ids=ids).logits
        want_rows = generate_batch(pm, tok, ["hello", "reset?"], max_new_tokens=5)
        pm.set_adapter("d2")
        want_d2 = generate_batch(pm, tok, ["hello", "reset?"], max_new_tokens=5)
    s.generate("hello", adapter="base", max_new_tokens=2)  # the base model answers first: the weights get repacked
    base4 = [m for m in pm.modules() if type(m).__name__ == "Linear4bit"]
    if not any(cpu_packed(getattr(m.weight, "quant_state", None)) for m in base4):
        pytest.skip("bitsandbytes did not repack for its CPU kernel on this machine (no AVX512-BF16)")
    pm.set_adapter("d1")
    pm.eval()
    with torch.no_grad(), fl.fused_lora(pm):
        got = pm(input_ids=ids).logits
    # bf16 kernels differ a little (0.5% of the largest logit here); PEFT's norms from the repacked weight: 10%
    assert (want - got).abs().max() < 0.02 * want.abs().max(), (want - got).abs().max()
    assert generate_batch(pm, tok, ["hello", "reset?"], max_new_tokens=5) == want_rows
    pm.set_adapter("d2")
    assert generate_batch(pm, tok, ["hello", "reset?"], max_new_tokens=5) == want_d2
    assert any(cpu_packed(getattr(m.weight, "quant_state", None)) for m in base4)  # fast layout kept after
    # PEFT's own forward, as a user's own s.model(...) / s.model.generate(...) runs it, reads the weight right too
    pm.set_adapter("d1")
    with torch.no_grad():
        own = pm(input_ids=ids).logits
    assert (want - own).abs().max() < 0.02 * want.abs().max(), (want - own).abs().max()


def _lean_fused_step(model, autocast=None):
    """Loss, trainable gradients, bytes autograd kept and the backward node names of one step with both
    switches on (fused LoRA layers and the lean norms/MLPs)."""
    from ft_magics.core.fused_lora import fused_lora
    from ft_magics.core.lean import lean_activations
    from ft_magics.core.speed import autocast_context

    torch.manual_seed(1)
    ids = torch.randint(0, 96, (3, 24)).to(next(model.parameters()).device)
    kept: dict = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.zero_grad(set_to_none=True)
    with fused_lora(model), lean_activations(model):
        with autocast_context(model, autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        names, todo, seen = set(), [loss.grad_fn], set()
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept.values()), names


@pytest.mark.parametrize("four_bit,bias", [(False, False), (False, True), (True, False)],
                         ids=["fp32", "fp32-biased-mlp", "4bit-bf16"])
def test_a_lora_down_proj_takes_the_silu_product_in_its_node_without_keeping_it(four_bit, bias, tiny_model_dir,
                                                                                  monkeypatch):
    """The SwiGLU MLP's product ``silu(g) * u`` feeds a fused LoRA down_proj: one node keeps g and u (which the
    SiLU's backward needs anyway) instead of the product too, with the same loss and gradients bit for bit
    as the two nodes it replaces."""
    from ft_magics.core import fused_lora as fl

    if four_bit:
        pm, autocast = _lora(_4bit_base(tiny_model_dir, "cpu")), torch.bfloat16
    else:
        pm, autocast = _lora(_tiny(bias=bias)), None
    loss1, g1, kept1, names1 = _lean_fused_step(pm, autocast)
    monkeypatch.setattr(fl, "silu_mul_down", lambda down, g, u: None)  # down_proj(lean product), as before
    loss0, g0, kept0, names0 = _lean_fused_step(pm, autocast)
    assert "SiluMulLoraFnBackward" in names1 and "SiluMulLoraFnBackward" not in names0
    assert "SiluMulFnBackward" in names0 and "SiluMulFnBackward" not in names1
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and any("down_proj.lora_A" in k for k in g0)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    cfg = pm.config
    product = 3 * 24 * cfg.intermediate_size * (2 if four_bit else 4)  # one (batch, length, width) product
    assert kept0 - kept1 >= cfg.num_hidden_layers * product, (kept0, kept1)


def test_dropout_on_down_proj_keeps_the_two_nodes():
    """With LoRA dropout the mask would have to be kept: the product goes to down_proj's own node."""
    pm = _lora(_tiny(), lora_dropout=0.1)
    pm.train()
    *_, names = _lean_fused_step(pm)
    assert "SiluMulLoraFnBackward" not in names and "SiluMulFnBackward" in names
