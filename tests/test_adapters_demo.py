"""Issue 5 on the real demo model (slow): rank-16 all-linear adapters, swap latency within loose
bounds of the benchmark's figures, and a mixed per-request batch equal to one request at a time."""
from __future__ import annotations

import statistics

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model

    from ft_magics import Session

    s = Session(adapters_dir=tmp_path_factory.mktemp("demo-adapters"))
    s.load("demo", bits=4)
    pm = None
    for i, name in enumerate(["t0", "t1", "t2"]):
        torch.manual_seed(i)
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                         task_type="CAUSAL_LM")
        if pm is None:
            pm = get_peft_model(s.handle.model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        pm.save_pretrained(str(s.adapters_dir), selected_adapters=[name])
    for name in ("t0", "t1", "t2"):  # peft saves a named (non-"default") adapter in a subfolder of its name
        assert (s.adapters_dir / name / "adapter_config.json").exists()
    s.handle.model = pm.unload()
    return s


def test_demo_swaps_and_routes(demo):
    from ft_magics.core.routing import AdapterRouter

    s = demo
    s.load_adapter(s.adapters_dir / "t0", "t0")
    s.load_adapter(s.adapters_dir / "t1", "t1")
    warm = [s.use("t0" if i % 2 else "t1") for i in range(40)]
    assert statistics.median(warm) < 5.0  # benchmark: ~0.4 ms; loose for a shared machine
    router = AdapterRouter(s, s.adapters_dir, capacity=1)
    router._ensure("t2", set())
    s.unload_adapter("t1")
    cold = [router._ensure("t1" if i % 2 == 0 else "t2", set()) for i in range(6)]
    assert {how for _, _, how in cold} == {"hot-swapped"}
    assert statistics.median(ms for _, ms, _ in cold) < 250.0  # benchmark: ~35 ms
    s.use("base")
    served = s.serve([("t2", "What is LoRA?"), ("base", "Name a colour."), ("t0", "Say hi.")],
                     store=s.adapters_dir, capacity=1, max_new_tokens=3)
    assert [r.mode for r in served] == ["mixed"] * 3
    # each row answered by its own adapter: the same first token as alone (a padded batch of three in bf16 rounds
    # differently from one prompt, so a later near-tie may go the other way: 'Ale,' alone, 'Alej' batched, on one
    # machine; the exact match of batch and one-at-a-time is test_routing's, in fp32)
    first = lambda text: s.tokenizer(text, add_special_tokens=False).input_ids[:1]  # noqa: E731
    assert first(served[1].text) == first(s.generate("Name a colour.", adapter="base", max_new_tokens=3).text)
    assert first(served[2].text) == first(s.generate("Say hi.", adapter="t0", max_new_tokens=3).text)
