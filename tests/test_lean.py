"""core.lean: Llama-style RMSNorm and SwiGLU MLP keep fewer tensors, with the same loss and gradients."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _tiny(dtype=torch.float32, hidden_act="silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, hidden_act=hidden_act)
    return LlamaForCausalLM(cfg).to(dtype)


def _step(model, lean: bool):
    """Loss, every gradient (parameters with requires_grad), and the bytes autograd kept."""
    from ft_magics.core.lean import lean_activations

    torch.manual_seed(1)
    ids = torch.randint(0, 96, (3, 24))
    kept: dict = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.zero_grad(set_to_none=True)
    with lean_activations(model, lean), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept.values())


def test_same_loss_and_gradients_with_fewer_bytes_kept():
    model = _tiny()
    loss0, g0, bytes0 = _step(model, False)
    loss1, g1, bytes1 = _step(model, True)
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert g0.keys() == g1.keys() and any("norm" in n for n in g0)  # norm weights' gradients are checked too
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n
    assert bytes1 < 0.85 * bytes0, (bytes0, bytes1)


def test_bf16_gradients_agree_within_bf16_rounding():
    model = _tiny(torch.bfloat16)
    loss0, g0, _ = _step(model, False)
    loss1, g1, _ = _step(model, True)
    assert abs(float(loss0) - float(loss1)) < 1e-2
    flat0 = torch.cat([g.float().flatten() for g in g0.values()])
    flat1 = torch.cat([g1[n].float().flatten() for n in g0])
    assert float((flat0 - flat1).norm() / flat0.norm()) < 2e-2


def test_only_llama_forwards_are_switched_and_only_inside_the_block():
    from ft_magics.core.lean import lean_activations, lean_modules

    model = _tiny()
    kinds = [k for _, k in lean_modules(model)]
    assert kinds.count("norm") == 5 and kinds.count("mlp") == 2  # 2 per layer + the final norm; 1 MLP per layer
    gelu = _tiny(hidden_act="gelu")  # a different activation: the MLP keeps its own forward
    assert [k for _, k in lean_modules(gelu)].count("mlp") == 0

    class OnePlusNorm(torch.nn.Module):  # Gemma-style: (1 + weight), a different forward
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * (1.0 + self.weight)

    assert not list(lean_modules(OnePlusNorm()))
    with lean_activations(model) as n:
        assert n == 7 and all("forward" in vars(m) for m, _ in lean_modules(model))
    assert not any("forward" in vars(m) for m, _ in lean_modules(model))


@pytest.mark.parametrize("module, switch", [("lean", "lean_activations"), ("fused_lora", "fused_lora")])
def test_training_uses_it_by_default_and_the_setting_turns_it_off(module, switch, tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    """Each module switch of core.training (lean_activations, fused_lora) is on by default; its YAML key turns it off."""
    import importlib

    from ft_magics import Session

    mod = importlib.import_module(f"ft_magics.core.{module}")
    calls = []
    real = getattr(mod, switch)

    def spy(model, enabled=True):
        calls.append(enabled)
        return real(model, enabled)

    monkeypatch.setattr(mod, switch, spy)
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=32)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    s.train("on", rows, {"max_steps": 1, "batch_size": 4})
    s.train("off", rows, {"max_steps": 1, "batch_size": 4, switch: False})
    assert calls == [True, False]
