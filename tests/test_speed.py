"""The chunked loss (ft_magics/core/speed.py): same loss and gradients as the standard one, knobs reachable."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt positions carry no loss
    labels[2, 9:] = -100  # a padded tail
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _lora_model(model_dir, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))
    model.train()
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_chunked_loss_equals_standard_loss_and_gradients(tiny_model_dir, chunk_rows):
    from ft_magics.core.speed import causal_lm_chunked_loss

    model = _lora_model(tiny_model_dir)
    batch = _batch(model.config.vocab_size)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    loss = causal_lm_chunked_loss(model, batch, chunk_rows=chunk_rows)
    loss.backward()
    grads = _grads(model)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (loss.item(), ref.item())
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_chunked_loss_with_num_items_and_trainable_head(tiny_model_dir):
    """Gradient-accumulation normalisation (sum / num_items_in_batch) and a head weight that trains."""
    from ft_magics.core.speed import causal_lm_chunked_loss

    model = _lora_model(tiny_model_dir)
    head = model.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(True)  # tied with the input embeddings: both paths contribute
    batch = _batch(model.config.vocab_size, seed=1)
    ref = model(**batch, num_items_in_batch=torch.tensor(40)).loss
    ref.backward()
    ref_w = head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    loss = causal_lm_chunked_loss(model, batch, chunk_rows=7, num_items=torch.tensor(40))
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(head.weight.grad, ref_w, rtol=1e-4, atol=1e-6)


def test_chunked_loss_bf16_close_to_standard(tiny_model_dir):
    from ft_magics.core.speed import causal_lm_chunked_loss

    model = _lora_model(tiny_model_dir, dtype=torch.bfloat16)
    batch = _batch(model.config.vocab_size, seed=2)
    ref = model(**batch).loss
    loss = causal_lm_chunked_loss(model, batch, chunk_rows=8)
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())


def test_no_loss_tokens_gives_zero_with_graph(tiny_model_dir):
    from ft_magics.core.speed import causal_lm_chunked_loss

    model = _lora_model(tiny_model_dir)
    batch = _batch(model.config.vocab_size)
    batch["labels"][:] = -100
    loss = causal_lm_chunked_loss(model, batch)
    loss.backward()  # must not raise
    assert loss.item() == 0.0


def test_eval_without_grad_matches(tiny_model_dir):
    from ft_magics.core.speed import causal_lm_chunked_loss

    model = _lora_model(tiny_model_dir)
    model.eval()
    batch = _batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        ref = model(**batch).loss
        loss = causal_lm_chunked_loss(model, batch, chunk_rows=3)
    assert torch.allclose(loss, ref, rtol=1e-5)


def test_blocker_for_softcapped_head(tiny_model_dir):
    from ft_magics.core.speed import chunked_loss_blocker

    model = _lora_model(tiny_model_dir)
    assert chunked_loss_blocker(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in chunked_loss_blocker(model)


def test_knobs_reachable_from_yaml_body():
    from ft_magics.config import TrainConfig, parse_yaml_body
    from ft_magics.errors import FtUsageError

    cfg = TrainConfig.from_dict(parse_yaml_body("chunked_loss: false\nloss_chunk_rows: 128\nautocast: off\n"))
    assert cfg.chunked_loss is False and cfg.loss_chunk_rows == 128 and cfg.autocast is False
    assert TrainConfig().chunked_loss is True and TrainConfig().autocast is True
    with pytest.raises(FtUsageError):
        TrainConfig.from_dict({"loss_chunk_rows": -1})


def test_training_uses_chunked_loss_and_matches_standard(shell, tiny_model_dir):
    """Through %%lora_train: the chunked run and the standard run reach the same losses."""
    import json

    shell.user_ns["_ft_test"] = [{"prompt": f"Question {i}?", "completion": f"Answer number {i}."} for i in range(16)]
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    losses = {}
    for flag in ("true", "false"):
        shell.run_cell_magic("lora_train", f"run-{flag} --data _ft_test --max-steps 3 --no-widgets",
                             f"chunked_loss: {flag}\nbatch_size: 4\nlog_every: 1\ndropout: 0.0\n")
        with open(f"adapters/run-{flag}/ft_run.json") as fh:
            rec = json.load(fh)
        assert rec["settings"]["chunked_loss"] is (flag == "true")
        losses[flag] = [l for _, l in rec["loss_history"]]
    assert len(losses["true"]) == 3
    for a, b in zip(losses["true"], losses["false"]):
        assert abs(a - b) < 1e-3 * max(abs(b), 1.0), losses


def test_autocast_keeps_lora_inputs_bf16_and_grads_fp32(tiny_model_dir):
    """Under autocast PEFT no longer casts LoRA inputs to fp32; the loss stays close and adapters still learn."""
    from ft_magics.core.speed import autocast_context, causal_lm_chunked_loss

    model = _lora_model(tiny_model_dir, dtype=torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # PEFT's default: fp32 adapter weights on a bf16 base
    batch = _batch(model.config.vocab_size, seed=4)
    seen = []
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
    hook = layer.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    plain = causal_lm_chunked_loss(model, batch)
    with autocast_context(model, torch.bfloat16):
        loss = causal_lm_chunked_loss(model, batch)
    hook.remove()
    assert seen[0] == (torch.float32, torch.float32)  # without autocast: an fp32 copy of the input
    assert seen[1] == (torch.bfloat16, torch.bfloat16)
    assert abs(loss.item() - plain.item()) < 2e-2 * abs(plain.item())
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_autocast_knob_off_and_fp32_model_use_plain_trainer(tiny_model_dir):
    from transformers import Trainer, TrainingArguments

    from ft_magics.core.speed import make_trainer

    model = _lora_model(tiny_model_dir)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    t = make_trainer(model, False, autocast_dtype=torch.float32, args=args)
    assert type(t) is Trainer
    t = make_trainer(model, False, autocast_dtype=torch.bfloat16, args=args)
    assert type(t) is not Trainer and t.autocast_dtype == torch.bfloat16 and t.chunked is False and t.own_attention
    # every lever off but an eval set: SpeedTrainer for its token-weighted eval loss, and nothing else of it (the
    # plain Trainer's attention, not ft_magics' own)
    from datasets import Dataset

    evals = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    t = make_trainer(model, False, autocast_dtype=torch.float32, args=args, eval_dataset=evals)
    assert type(t) is not Trainer and not t.own_attention
    assert type(t._attention({"input_ids": torch.tensor([[1, 2, 3]])}, model)).__name__ == "nullcontext"
    t.own_attention = True
    assert type(t._attention({"input_ids": torch.tensor([[1, 2, 3]])}, model)).__name__ != "nullcontext"


def test_autocast_with_gradient_checkpointing_trains(tiny_model_dir, tmp_path):
    """Regression: checkpointed layers are recomputed in the backward with the forward's dtypes."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from ft_magics.core.speed import make_trainer

    model = _lora_model(tiny_model_dir, dtype=torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    model.enable_input_require_grads()
    batch = _batch(model.config.vocab_size, seed=5)
    rows = [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(batch["input_ids"], batch["labels"])]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2,
                             per_device_train_batch_size=3, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(model, True, autocast_dtype=torch.bfloat16, args=args, train_dataset=Dataset.from_list(rows),
                           data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_cpu_batches_get_our_attention_with_the_math_kernel_behind_short_rows():
    """attention_for installs ft_magics' causal attention for every CPU batch (and removes it after); for rows
    at or below SHORT_ATTENTION_LEN tokens what it hands on gets the math kernel in 16 bits, longer rows keep
    PyTorch's own choice; a model not on SDPA is left alone."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ft_magics.core import speed

    class Cfg:
        _attn_implementation = "sdpa"

    class M:
        config = Cfg()

    q = torch.randn(1, 2, 8, 4)
    short = speed.attention_for({"input_ids": torch.zeros(2, speed.SHORT_ATTENTION_LEN, dtype=torch.long)}, M())
    long_ = speed.attention_for({"input_ids": torch.zeros(2, 4 * speed.SHORT_ATTENTION_LEN, dtype=torch.long)}, M())
    flags = torch.backends.cuda
    assert not flags.fp16_bf16_reduction_math_sdp_allowed()
    with short:  # only the math kernel is allowed: the CPU flash kernel must not be picked
        assert "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
        assert torch._fused_sdp_choice(q, q, q) == SDPBackend.MATH.value
        assert flags.fp16_bf16_reduction_math_sdp_allowed()  # and it keeps bf16 inputs in bf16
    assert not flags.fp16_bf16_reduction_math_sdp_allowed()  # restored
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    with long_:
        assert "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
        assert torch._fused_sdp_choice(q, q, q) != SDPBackend.MATH.value
        assert not flags.fp16_bf16_reduction_math_sdp_allowed()
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    Cfg._attn_implementation = "eager"
    with speed.attention_for({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, M()):
        assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
        assert torch._fused_sdp_choice(q, q, q) != SDPBackend.MATH.value


def test_mmap_threshold_is_set_and_can_be_left_alone(monkeypatch):
    from ft_magics.core import memory

    monkeypatch.setenv("FT_MAGICS_MMAP_THRESHOLD", "0")
    assert memory.fix_mmap_threshold() == 0
    monkeypatch.setenv("FT_MAGICS_MMAP_THRESHOLD", str(2 << 20))
    assert memory.fix_mmap_threshold() == 2 << 20  # glibc accepted it (this machine runs glibc)
    monkeypatch.delenv("FT_MAGICS_MMAP_THRESHOLD")
    assert memory.fix_mmap_threshold() == memory.MMAP_THRESHOLD


HEAP_CHECK = """
import ctypes, json, os
from ft_magics.core import memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def rss_drop_on_free(size):
    # RSS given back when a touched block of `size` is freed while a later block sits above it
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    pin = libc.malloc(1 << 20)  # too big for any hole below: above the block, which is then not the top
    ctypes.memset(pin, 1, 1 << 20)
    before = memory.rss_bytes()
    libc.free(block)
    dropped = before - memory.rss_bytes()
    libc.free(pin)
    return dropped


out = {"fixed": memory.fix_mmap_threshold(), "before": rss_drop_on_free(16 << 20)}
with memory.heap_for_training("cpu", True) as threshold:
    out["threshold"], out["inside"] = threshold, rss_drop_on_free(16 << 20)
out["after"] = rss_drop_on_free(24 << 20)
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_heap_for_training_keeps_freed_blocks_for_reuse_and_gives_them_back_after(monkeypatch):
    import json
    import subprocess

    from ft_magics.core import memory

    # glibc's heap in a fresh process: in this one, earlier tests' holes decide where blocks land
    env = {k: v for k, v in os.environ.items() if k != "FT_MAGICS_MMAP_THRESHOLD"}
    run = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True, env=env, timeout=120,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["fixed"] == memory.MMAP_THRESHOLD
    assert out["before"] > 15 << 20  # a mapping of its own: back to the OS at once
    assert out["threshold"] == memory.TRAINING_MMAP_THRESHOLD
    assert out["inside"] < 2 << 20  # kept in the heap for the next step
    assert out["after"] > 23 << 20  # the 1 MB threshold is back
    monkeypatch.delenv("FT_MAGICS_MMAP_THRESHOLD", raising=False)
    for device, reuse in (("cpu", False), ("cuda", True), ("cuda:0", True)):
        with memory.heap_for_training(device, reuse) as threshold:
            assert threshold == 0
    monkeypatch.setenv("FT_MAGICS_MMAP_THRESHOLD", str(2 << 20))  # pinned by the user: left alone
    with memory.heap_for_training("cpu", True) as threshold:
        assert threshold == 0


def test_a_cpu_run_starts_from_a_trimmed_heap(monkeypatch):
    """The holes loading and tokenising left in glibc's heap are returned before training starts, not left for
    the step's small long-lived allocations to land in (checkpointed bundled set: peak 862-867 MB against
    868-940 MB); on a GPU the host heap is left alone."""
    from ft_magics.core import memory

    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    with memory.heap_for_training("cuda:0", True):
        pass
    assert trims == []
    for reuse in (True, False):
        with memory.heap_for_training("cpu", reuse):
            assert len(trims) >= 1  # before the first step, whatever the threshold
        trims.clear()


@pytest.mark.parametrize("reuse", [True, False])
def test_cpu_training_raises_the_threshold_only_for_the_run(tiny_model_dir, tmp_path, monkeypatch, reuse):
    from ft_magics import Session
    from ft_magics.core import memory

    monkeypatch.delenv("FT_MAGICS_MMAP_THRESHOLD", raising=False)
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4, device="cpu")
    seen = []
    real = memory.set_mmap_threshold
    monkeypatch.setattr(memory, "set_mmap_threshold", lambda v: (seen.append(v), real(v))[1])
    r = s.train("h", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)],
                {"max_steps": 1, "batch_size": 4, "heap_reuse": reuse})
    assert r.record["status"] == "completed" and r.record["settings"]["heap_reuse"] is reuse
    assert seen == ([memory.TRAINING_MMAP_THRESHOLD, memory.MMAP_THRESHOLD] if reuse else [])


def test_a_one_step_run_trains_the_first_step_is_not_lost_to_warmup(tiny_model_dir, tmp_path):
    """transformers' warm-up gives step 0 a learning rate of 0; ours starts at 1/w of the peak, so even a
    one-step run moves the adapter (LoRA B starts at zero and stays there at lr 0)."""
    import torch
    from safetensors.torch import load_file

    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=32)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    s.train("one", rows, {"max_steps": 1, "batch_size": 4, "warmup": 0.03, "learning_rate": 1e-2})
    b = [t for k, t in load_file(str(tmp_path / "ad" / "one" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and any(torch.count_nonzero(t) > 0 for t in b)
    from ft_magics.core.events import Listener

    class LRs(Listener):
        seen: list = []

        def on_step(self, e):
            self.seen.append(e.learning_rate)

    lrs = LRs()
    s.train("four", rows, {"max_steps": 4, "batch_size": 4, "warmup": 2, "learning_rate": 1e-2, "log_every": 1,
                           "lr_scheduler": "linear"}, listeners=[lrs])
    assert lrs.seen[:2] == pytest.approx([5e-3, 1e-2])  # 1/2, 2/2 of the peak: no step at lr 0


def test_training_leaves_the_kv_cache_setting_as_it_found_it(tiny_model_dir, tmp_path):
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=32)
    assert s.model.config.use_cache is True
    s.train("c", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)], {"max_steps": 1, "batch_size": 4})
    assert s.model.get_base_model().config.use_cache is True


def test_a_4bit_load_keeps_no_tensor_in_the_mapped_weights_file(tiny_model_dir, tmp_path):
    """transformers leaves the unquantised tensors (embeddings, norms) of a file already in the compute dtype
    as views into the mmapped safetensors file, which keeps the whole file's touched pages resident;
    load_model copies them out."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from ft_magics.core import memory
    from ft_magics.core.loading import load_model

    bf16_dir = tmp_path / "bf16"  # saved in bf16, the compute dtype: transformers converts nothing
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    for f in tiny_model_dir.glob("*token*"):
        shutil.copy(f, bf16_dir)

    def in_file(module):
        ranges = memory._file_mappings(".safetensors")
        return [n for n, t in module.state_dict().items()
                if any(a <= t.untyped_storage().data_ptr() < b for a, b in ranges)]

    h = load_model(str(bf16_dir), bits=4, device="cpu", dtype="bf16")
    assert in_file(h.model) == []
    lm = h.model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still tied
    ids = h.tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(lm(ids).logits).all()

    # the helper itself: a tensor that does lie in such a mapping is copied out, and only that one
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        key = next(iter(f.keys()))
        mapped = f.get_tensor(key)
    holder = torch.nn.Module()
    holder.mapped = torch.nn.Parameter(mapped, requires_grad=False)
    holder.own = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    before = holder.mapped.clone()
    inside = bool(in_file(holder))
    copied = memory.detach_from_files(holder)
    assert in_file(holder) == []
    assert copied == (mapped.nbytes if inside else 0)
    assert torch.equal(holder.mapped, before) and torch.equal(holder.own, torch.ones(3))


def test_importing_ft_magics_bounds_the_cpu_kernel_caches():
    """Each new matmul shape adds compiled oneDNN/ideep kernels that are kept (1024 by default); after
    `import ft_magics` the caches are bounded, so 48 new shapes no longer grow the process."""
    import subprocess

    code = (
        "import ft_magics, torch, psutil\n"
        "w = [torch.randn(o, 96, dtype=torch.bfloat16) for o in (96, 32, 256)]\n"
        "def run(m):\n"
        "    x = torch.randn(m, 96, dtype=torch.bfloat16, requires_grad=True)\n"
        "    sum(torch.nn.functional.linear(x, v).sum() for v in w).backward()\n"
        "for m in range(300, 320): run(m)\n"
        "rss = psutil.Process().memory_info().rss\n"
        "for m in range(320, 800, 10): run(m)\n"
        "print(psutil.Process().memory_info().rss - rss)\n"
    )

    def growth(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             check=True, cwd=str(Path(__file__).resolve().parent.parent))
        return int(out.stdout.split()[-1])

    unbounded = growth(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    bounded = growth()
    assert unbounded > 20 * 2**20, unbounded  # the effect is there to bound: about 1 MB per shape here
    assert bounded < unbounded / 3, (bounded, unbounded)


def test_math_kernel_in_bf16_matches_fp32_math_and_keeps_less():
    """The math kernel without its fp32 upcast gives the same attention (to bf16 rounding) and its
    gradients, and autograd keeps less for the backward."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ft_magics.core import speed

    torch.manual_seed(0)
    qkv = [torch.randn(4, 3, 40, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]

    def run(ctx):
        saved = []
        with ctx, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            out = F.scaled_dot_product_attention(*qkv, is_causal=True)
        grads = torch.autograd.grad(out.float().square().sum(), qkv)
        return out, grads, sum(saved)

    ref_out, ref_grads, ref_kept = run(sdpa_kernel(SDPBackend.MATH))
    out, grads, kept = run(speed._causal_row_attention())
    assert (out.float() - ref_out.float()).abs().max() < 2e-2
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r.float()).norm() / r.float().norm() < 2e-2
    assert kept < 0.75 * ref_kept, (kept, ref_kept)


class _Attention(torch.nn.Module):
    is_causal = True

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("groups, kv_heads", [(1, 4), (2, 2), (3, 3)])
def test_grouped_causal_attention_equals_transformers_sdpa(groups, kv_heads):
    """Same output and gradients as transformers' SDPA path (repeat_kv + PyTorch's math kernel, which short
    rows used before) in fp32, and autograd keeps less: each key/value head once, not once per query head."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ft_magics.core.speed import causal_grouped_attention

    torch.manual_seed(0)
    b, length, dim = 2, 37, 16
    q = torch.randn(b, groups * kv_heads, length, dim, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, length, dim, requires_grad=True) for _ in range(2))

    def run(fn, **kw):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            out, _ = fn(_Attention(groups), q, k, v, None, scaling=0.25, **kw)
        return out, torch.autograd.grad(out.square().sum(), (q, k, v)), sum(saved)

    with sdpa_kernel(SDPBackend.MATH):
        ref, ref_grads, ref_kept = run(sdpa_attention_forward)
    out, grads, kept = run(causal_grouped_attention, fallback=None)
    assert out.shape == ref.shape == (b, length, groups * kv_heads, dim)
    assert torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)
    if groups > 1:
        assert kept < ref_kept, (kept, ref_kept)


@pytest.mark.parametrize("case", ["mask", "dropout", "window", "softcap", "cache", "not-causal", "one-token",
                                  "value-width", "long-value-width"])
def test_grouped_causal_attention_hands_other_cases_to_sdpa(case):
    from ft_magics.core import speed
    from ft_magics.core.speed import causal_grouped_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    calls = []

    def fallback(*a, **kw):
        calls.append(kw)
        return "sdpa", None

    # a plain causal call (a window longer than the rows changes nothing) is computed here
    out, _ = causal_grouped_attention(_Attention(2), q, k, v, None, fallback=fallback, sliding_window=64)
    assert torch.is_tensor(out) and not calls
    mask, kw, module = None, {}, _Attention(2)
    if case == "mask":
        mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    elif case == "dropout":
        kw["dropout"] = 0.1
    elif case == "window":
        kw["sliding_window"] = 3
    elif case == "softcap":
        kw["softcap"] = 30.0
    elif case == "cache":  # new queries against a longer cached key/value
        k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    elif case == "not-causal":
        module.is_causal = False
    elif case == "one-token":
        q, k, v = q[:, :, :1], k[:, :, :1], v[:, :, :1]
    elif case == "value-width":  # value heads narrower than query/key heads (as in multi-head latent attention)
        v = torch.randn(1, 2, 6, 4)
    elif case == "long-value-width":  # the same on rows long enough for the blockwise attention
        n = 2 * speed.SHORT_ATTENTION_LEN
        q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 4)
    assert causal_grouped_attention(module, q, k, v, mask, fallback=fallback, **kw)[0] == "sdpa" and len(calls) == 1


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_longer_rows_train_through_the_block_attention(tiny_model_dir, tmp_path, ckpt):
    """Rows over SHORT_ATTENTION_LEN tokens go through the blockwise attention, with or without gradient
    checkpointing, and the run learns."""
    from ft_magics import Session
    from ft_magics.core import speed

    real, calls = speed.block_causal_attention, []

    def counting(q, *a, **kw):
        calls.append(q.shape[2])  # the rows' length
        return real(q, *a, **kw)

    words = " ".join(f"word{j}" for j in range(90))  # well over 128 tokens a row
    rows = [{"prompt": f"question {i} {words}", "completion": f"answer {i % 3}"} for i in range(8)]
    s = Session(adapters_dir=tmp_path / "long")
    s.load(str(tiny_model_dir), bits=16, device="cpu")
    speed.block_causal_attention = counting
    try:
        r = s.train("x", rows, {"max_steps": 3, "batch_size": 4, "seed": 1, "learning_rate": 1e-2,
                                "gradient_checkpointing": ckpt})
    finally:
        speed.block_causal_attention = real
    assert r.record["status"] == "completed"
    assert calls and min(calls) > speed.SHORT_ATTENTION_LEN
    assert len(calls) >= 3 * s.model.config.num_hidden_layers  # every layer of every step
    losses = [l for _, l in r.record["loss_history"]]
    assert losses[-1] < losses[0], losses
    assert speed._causal_bias.cache_info().currsize == 0  # the blocks' bias does not outlive the step


@pytest.mark.parametrize("groups, kv_heads, length, block", [(1, 4, 37, 16), (2, 2, 150, 64), (3, 3, 70, 16),
                                                             (3, 1, 33, 64)])
def test_block_causal_attention_equals_sdpa_and_keeps_no_scores(groups, kv_heads, length, block, monkeypatch):
    """Same output and gradients as PyTorch's causal SDPA (exact to fp64 rounding) with one block or several,
    a last block shorter than the others included, and nothing of size length x length kept for the
    backward: only q (regrouped), k and v."""
    import torch.nn.functional as F

    from ft_magics.core import speed

    monkeypatch.setattr(speed, "ATTENTION_BLOCK_ROWS", block)
    torch.manual_seed(0)
    b, dim = 2, 8
    q = torch.randn(b, groups * kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, length, dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = speed.block_causal_attention(q, k, v, 0.3)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         is_causal=True, scale=0.3).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert out.shape == ref.shape == (b, length, groups * kv_heads, dim)
    assert torch.allclose(out, ref, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-12)
    assert sum(saved) == q.numel() + k.numel() + v.numel(), saved


def test_block_size_shrinks_for_long_rows_and_many_heads():
    from ft_magics.core import speed

    assert speed._query_block(24, 3, 512, 2) == speed.ATTENTION_BLOCK_ROWS  # the demo model at 512 tokens
    big = speed._query_block(32, 4, 2048, 2)  # batch 4 x 8 key/value heads x 4 groups at 2048 tokens
    assert 16 < big < speed.ATTENTION_BLOCK_ROWS
    assert 32 * 4 * big * 2048 * 2 <= speed.ATTENTION_SCORES_BYTES < 32 * 4 * (big + 1) * 2048 * 2
    assert speed._query_block(512, 8, 32768, 2) == 16  # never below 16 rows


def test_short_rows_train_through_the_grouped_attention_and_restore_sdpa(tiny_model_dir, tmp_path):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ft_magics import Session
    from ft_magics.core import speed

    real, calls = speed.causal_grouped_attention, []

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    rows = [{"prompt": f"question {i}", "completion": f"answer {i % 3}"} for i in range(16)]
    s = Session(adapters_dir=tmp_path / "att")
    s.load(str(tiny_model_dir), bits=16, device="cpu")
    speed.causal_grouped_attention = counting
    try:
        r = s.train("x", rows, {"max_steps": 2, "batch_size": 4, "seed": 1})
    finally:
        speed.causal_grouped_attention = real
    assert r.record["status"] == "completed"
    layers = s.model.config.num_hidden_layers
    assert len(calls) >= 2 * layers  # every layer of every step (forward; recomputed under checkpointing)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before and "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert speed._causal_bias.cache_info().currsize == 0  # no bias outlives the step that made it


def test_auto_chunk_rows_caps_rows_and_bytes():
    from ft_magics.core.speed import DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_ROWS, auto_chunk_rows

    assert auto_chunk_rows(49152) == DEFAULT_CHUNK_ROWS == 128  # the demo model: 24 MB of fp32 logits
    big = auto_chunk_rows(256_000)  # a 256k vocabulary: the byte budget binds
    assert big < DEFAULT_CHUNK_ROWS and big * 4 * 256_000 <= DEFAULT_CHUNK_BYTES
    assert auto_chunk_rows(10**9) == 16
    assert auto_chunk_rows(49152, checkpointed=True) == 64 and auto_chunk_rows(10**9, checkpointed=True) == 16


@pytest.mark.parametrize("checkpointing,rows", [(True, 64), (False, 128)])
def test_a_checkpointed_run_takes_smaller_loss_chunks(tiny_session, monkeypatch, checkpointing, rows):
    """Gradient checkpointing is the memory-bound mode: its auto loss chunks are 64 rows, not 128 (bundled set:
    peak 870-872 against 887-916 MB at the same speed); loss_chunk_rows still sets any other."""
    from ft_magics.core import speed

    seen = []
    real = speed.make_trainer
    monkeypatch.setattr(speed, "make_trainer", lambda model, chunked, chunk_rows=0, **kw: seen.append(chunk_rows)
                        or real(model, chunked, chunk_rows, **kw))
    cfg = {"max_steps": 1, "batch_size": 2, "r": 4, "gradient_checkpointing": checkpointing}
    tiny_session.train("c", "demo:support", cfg)
    tiny_session.train("d", "demo:support", {**cfg, "loss_chunk_rows": 24})
    assert seen == [rows, 24]


def test_chunk_bytes_count_both_logits_blocks():
    from ft_magics.core.speed import chunk_bytes

    assert chunk_bytes(128, 49152) == 128 * 49152 * 6 and chunk_bytes(128, 49152, compute_bytes=4) == 128 * 49152 * 4


def test_loss_workspace_blocks_are_reused_across_chunks_and_calls(tiny_model_dir):
    """A workspace's logits blocks are made once (grown only for more rows) and give the same loss and
    gradients as fresh blocks."""
    from ft_magics.core.speed import LossWorkspace, causal_lm_chunked_loss

    model = _lora_model(tiny_model_dir)
    batch = _batch(model.config.vocab_size)
    ref = causal_lm_chunked_loss(model, batch, chunk_rows=5)
    ref.backward()
    ref_grads = _grads(model)
    ws = LossWorkspace()
    pointers = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_chunked_loss(model, batch, chunk_rows=5, workspace=ws)
        loss.backward()
        assert torch.equal(loss, ref)
        for name, g in _grads(model).items():
            assert torch.equal(g, ref_grads[name]), name
        (low, high), = ws._blocks.values()
        assert low is high and high.shape == (5, model.config.vocab_size)  # fp32 model: one block serves
        pointers.append(high.data_ptr())
    assert pointers[0] == pointers[1]
    low, high = ws.blocks(9, model.config.vocab_size, torch.bfloat16, "cpu")
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32 and high.shape == low.shape == (9, model.config.vocab_size)
    ws.clear()
    assert not ws._blocks


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_training_makes_the_loss_blocks_once_per_run(tiny_model_dir, tmp_path, ckpt):
    from ft_magics import Session
    from ft_magics.core import speed

    made, rows_asked = [], []
    real_empty, real_blocks = torch.empty, speed.LossWorkspace.blocks

    def counting_empty(*size, **kw):
        dims = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if len(dims) == 2 and dims[1] == vocab:
            made.append(dims)
        return real_empty(*size, **kw)

    def blocks(self, rows, *a, **kw):
        rows_asked.append(rows)
        return real_blocks(self, rows, *a, **kw)

    rows = [{"prompt": f"question {i} about the order", "completion": " ".join(["answer"] * 18) + f" {i}"}
            for i in range(24)]
    s = Session(adapters_dir=tmp_path / "ws")
    s.load(str(tiny_model_dir), bits=16, device="cpu")
    vocab = s.model.config.vocab_size
    torch.empty, speed.LossWorkspace.blocks = counting_empty, blocks
    try:
        r = s.train("x", rows, {"max_steps": 5, "batch_size": 4, "seed": 3, "gradient_checkpointing": ckpt,
                                "loss_chunk_rows": 16}, eval_data=rows[:8])
    finally:
        torch.empty, speed.LossWorkspace.blocks = real_empty, real_blocks
    assert r.record["status"] == "completed" and r.eval_loss is not None
    assert len(rows_asked) >= 5 * 2  # every step ran several chunks through the workspace
    # one pair of blocks (bf16 and fp32) for the training and the evaluation after it; fresh blocks for every
    # chunk would be two per chunk, and a workspace of the evaluation's own two more
    assert len(made) <= 2 and len(rows_asked) >= 2 * len(made), (made, len(rows_asked))


def test_gradient_checkpointing_is_true_false_or_auto():
    from ft_magics.config import TrainConfig
    from ft_magics.errors import FtUsageError

    assert TrainConfig().gradient_checkpointing == "auto"
    for given, got in (("auto", "auto"), (" AUTO ", "auto"), (True, True), ("yes", True), ("off", False), (False, False)):
        assert TrainConfig.from_dict({"gradient_checkpointing": given}).gradient_checkpointing == got
    with pytest.raises(FtUsageError, match="gradient_checkpointing must be true, false or auto, got 'maybe'"):
        TrainConfig.from_dict({"gradient_checkpointing": "maybe"})


def test_auto_checkpointing_follows_the_estimate_against_free_memory(tiny_model_dir):
    """auto: on exactly when the planner's activation estimate for the longest batch passes half the free
    memory; an explicit true/false is kept whatever the memory."""
    from transformers import AutoModelForCausalLM

    from ft_magics.config import TrainConfig
    from ft_magics.core.data import TokenizedExample
    from ft_magics.core.planner import activation_bytes, dims_from_config
    from ft_magics.core.training import checkpointing_for

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [TokenizedExample(input_ids=[1] * n, labels=[1] * n) for n in (10, 300, 40, 20)]
    cfg = TrainConfig.from_dict({"batch_size": 4, "max_seq_len": 256})
    need = activation_bytes(dims_from_config(model.config.to_dict()), 256, 4, False, True)  # longest row, capped
    on, why = checkpointing_for(cfg, model, "cpu", rows, free=int(need * 1.9))
    assert on and why.startswith("auto: on") and "4 x 256 tokens" in why
    on, why = checkpointing_for(cfg, model, "cpu", rows, free=int(need * 2.1))
    assert not on and why.startswith("auto: off")
    for fixed in (True, False):
        cfg_fixed = TrainConfig.from_dict({"gradient_checkpointing": fixed})
        assert checkpointing_for(cfg_fixed, model, "cpu", rows, free=1) == (fixed, "")


def test_lora_train_checkpointing_flags_and_auto_record(shell, tiny_model_dir, monkeypatch, capsys):
    """--gradient-checkpointing / --no-gradient-checkpointing / auto, as typed; the run record says what
    the run did and, for auto, why; a low-memory auto run turns it on and says so."""
    import json

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = [{"prompt": f"reset password {i}?", "completion": "Use the reset link."} for i in range(6)]

    def settings(name):
        return json.loads(Path(f"adapters/{name}/ft_run.json").read_text())["settings"]

    shell.run_cell_magic("lora_train", "on --data rows --max-steps 1 --no-widgets --gradient-checkpointing", "r: 4\n")
    assert settings("on")["gradient_checkpointing"] is True and "gradient_checkpointing_auto" not in settings("on")
    shell.run_cell_magic("lora_train", "off --data rows --max-steps 1 --no-widgets --no-gradient-checkpointing",
                         "gradient_checkpointing: true\n")  # the flag wins over the body
    assert settings("off")["gradient_checkpointing"] is False
    shell.run_cell_magic("lora_train", "roomy --data rows --max-steps 1 --no-widgets", "r: 4\n")
    assert settings("roomy")["gradient_checkpointing"] is False
    assert settings("roomy")["gradient_checkpointing_auto"].startswith("auto: off")
    # a low-memory machine, as auto sees it: activations above a tiny share of what is free (faking the free
    # memory itself would also trip the checks that refuse a run that cannot fit at all)
    from ft_magics.core import training

    monkeypatch.setattr(training, "AUTO_CHECKPOINTING_SHARE", 1e-9)
    capsys.readouterr()
    shell.run_cell_magic("lora_train", "tight --data rows --max-steps 1 --no-widgets", "gradient_checkpointing: auto\n")
    assert settings("tight")["gradient_checkpointing"] is True
    assert "gradient checkpointing auto: on" in capsys.readouterr().out


@pytest.mark.parametrize("chunked", [True, False])
def test_evaluation_uses_the_same_attention_as_training(tiny_model_dir, tmp_path, monkeypatch, chunked):
    """Both evaluation branches (chunked loss or the standard one) run under the same attention choice as
    training."""
    import contextlib

    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from ft_magics.core import speed

    entered = []

    @contextlib.contextmanager
    def recording(math_kernel=True):
        entered.append(math_kernel)
        yield

    monkeypatch.setattr(speed, "_causal_row_attention", recording)
    model = _lora_model(tiny_model_dir)
    rows = [{"input_ids": [5 + i, 6, 7, 8, 9, 10], "labels": [5 + i, 6, 7, 8, 9, 10],
             "attention_mask": [1] * 6} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = speed.make_trainer(model, chunked, autocast_dtype=torch.bfloat16, args=args,
                                 eval_dataset=Dataset.from_list(rows), data_collator=default_data_collator)
    loss = trainer.evaluate()["eval_loss"]
    assert entered == [True, True]  # one per eval batch, short rows: the math kernel behind it
    assert math.isfinite(loss)


def test_a_quantised_cpu_load_reads_tensors_without_mapping_the_file(tiny_model_dir, tmp_path, monkeypatch):
    """Inside read_weights_into_memory transformers opens safetensors with the pread backend, so no mapping of
    the 16-bit file is left resident; load_model uses it for quantised CPU loads (and not for 16-bit ones,
    whose weights are the mapped file's pages, shared with the page cache)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import modeling_utils as mu

    from ft_magics.core import memory
    from ft_magics.core.loading import load_model, quantization_config

    backends = []
    real = mu.safe_open

    def spy(*a, **kw):
        backends.append(kw.get("backend"))
        return real(*a, **kw)

    bf16_dir = tmp_path / "bf16"  # saved in the compute dtype: through a mapping, kept tensors stay views of it
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    monkeypatch.setattr(mu, "safe_open", spy)
    weights = str(bf16_dir / "model.safetensors")

    def mapped():
        with open("/proc/self/maps") as fh:
            return [line for line in fh if line.rstrip("\n").endswith(weights)]

    kw = dict(dtype=torch.bfloat16, device_map={"": "cpu"}, quantization_config=quantization_config(4, torch.bfloat16))
    with memory.read_weights_into_memory() as on:
        assert on and mu.safe_open is not spy
        inside = AutoModelForCausalLM.from_pretrained(str(bf16_dir), **kw)
    assert mu.safe_open is spy and backends == ["pread"]
    assert mapped() == []  # nothing of the file stays mapped, though the embeddings were kept as they were
    ids = torch.tensor([[1, 2, 3]])
    outside = AutoModelForCausalLM.from_pretrained(str(bf16_dir), **kw)
    assert backends[-1] == "mmap" and mapped() != []  # the embeddings are views of the mapped file
    with torch.no_grad():
        assert torch.equal(inside(ids).logits, outside(ids).logits)
    del outside

    backends.clear()
    load_model(str(tiny_model_dir), bits=4, device="cpu", dtype="bf16")
    load_model(str(tiny_model_dir), bits=16, device="cpu", dtype="bf16")
    assert backends == ["pread", "mmap"]


# --------------------------------------------------------------------------- lean_steps
def _lean_steps_run(model_dir, tmp_path, lean: bool, steps: int, eval_rows=None):
    """A 4-bit run with clipping that bites (max_grad_norm far below the gradient norms) and gradient
    accumulation (zero_grad between optimizer steps matters); returns the losses, the grad norms, the saved
    adapter, the number of modules visited by module walks (``named_modules`` calls) in the run and the
    number of modules in the model."""
    from safetensors.torch import load_file

    from ft_magics import Session
    from ft_magics.core.events import Listener

    class Norms(Listener):
        def __init__(self):
            self.seen = []

        def on_step(self, e):
            self.seen.append(e.grad_norm)

    rows = [{"prompt": f"question {i} about the order", "completion": f"answer {i % 5}"} for i in range(40)]
    s = Session(adapters_dir=tmp_path / f"lean-{lean}-{steps}")
    s.load(str(model_dir), bits=4, device="cpu")
    walks = [0]
    real = torch.nn.Module.named_modules

    def counting(self, *a, **kw):  # called once per module a walk reaches (the walk recurses through it)
        walks[0] += 1
        return real(self, *a, **kw)

    norms = Norms()
    torch.nn.Module.named_modules = counting
    try:
        r = s.train("x", rows, {"max_steps": steps, "batch_size": 4, "grad_accum": 2, "max_grad_norm": 0.05,
                                "learning_rate": 5e-3, "warmup": 0, "seed": 3, "log_every": 1, "lean_steps": lean},
                    listeners=[norms], eval_data=eval_rows)
    finally:
        torch.nn.Module.named_modules = real
    adapter = load_file(str(tmp_path / f"lean-{lean}-{steps}" / "x" / "adapter_model.safetensors"))
    assert "train" not in s.model.__dict__ and "zero_grad" not in s.model.__dict__  # the model's own methods back
    return [l for _, l in r.record["loss_history"]], norms.seen, adapter, walks[0], len(list(s.model.modules()))


def test_lean_steps_train_the_same_steps_without_walking_the_model_each_step(tiny_model_dir, tmp_path):
    losses_off, norms_off, adapter_off, walks_off_6, _ = _lean_steps_run(tiny_model_dir, tmp_path, False, 6)
    losses_on, norms_on, adapter_on, walks_on_6, _ = _lean_steps_run(tiny_model_dir, tmp_path, True, 6)
    assert max(norms_off) > 0.2  # clipping to 0.05 changes every step: the clipped set of parameters matters
    assert losses_on == pytest.approx(losses_off, abs=1e-5) and norms_on == pytest.approx(norms_off, rel=1e-4)
    assert adapter_on.keys() == adapter_off.keys()
    for k in adapter_off:
        assert torch.allclose(adapter_on[k], adapter_off[k], atol=1e-6), k
    # modules visited per step: Trainer + PEFT walk the whole model several times a step; lean_steps, almost
    # none (a first-parameter lookup for the autocast device stops at the first module)
    walks_off_2, n_modules = _lean_steps_run(tiny_model_dir, tmp_path, False, 2)[3:]
    walks_on_2 = _lean_steps_run(tiny_model_dir, tmp_path, True, 2)[3]
    assert (walks_off_6 - walks_off_2) / 4 >= 3 * n_modules, (walks_off_2, walks_off_6, n_modules)
    assert (walks_on_6 - walks_on_2) / 4 <= n_modules / 10, (walks_on_2, walks_on_6, n_modules)


def test_lean_steps_keep_train_and_eval_modes_right_around_evaluation(tiny_model_dir, tmp_path):
    """Evaluation puts every module in eval mode; the next training step must put them back (dropout on)."""
    from ft_magics.core.speed import listed_step_calls, model_walks

    model = _lora_model(tiny_model_dir)
    walks = model_walks(model)
    with listed_step_calls(model, walks):
        model.eval()
        assert not any(m.training for m in model.modules())
        model.train()
        assert all(m.training for m in model.modules())
        model.base_model.model.model.layers[0].eval()  # one block switched by hand: train() must still reach it
        model.train()
        assert all(m.training for m in model.modules())
        model(**_batch(model.config.vocab_size)).loss.backward()
        assert all(p.grad is not None for p in walks.trainable)
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__


# --------------------------------------------------------------------------- causal_mask_only
def test_only_a_right_padding_mask_is_dropped():
    from ft_magics.core.speed import without_padding_mask

    ids = torch.ones(2, 4, dtype=torch.long)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert "attention_mask" not in without_padding_mask(right) and "input_ids" in without_padding_mask(right)
    for mask in ([[1, 1, 1, 1], [0, 0, 1, 1]],  # left padding
                 [[1, 0, 1, 1], [1, 1, 1, 1]],  # a hole
                 [[1, 1, 2, 2], [1, 1, 1, 0]]):  # segment ids, not a padding mask
        batch = {"input_ids": ids, "attention_mask": torch.tensor(mask)}
        assert without_padding_mask(batch) is batch, mask
    packed = dict(right, position_ids=torch.arange(4).repeat(2, 1))
    assert without_padding_mask(packed) is packed


def test_the_causal_mask_alone_gives_the_same_loss_and_gradients(tiny_model_dir):
    from ft_magics.core.speed import causal_lm_chunked_loss, without_padding_mask

    model = _lora_model(tiny_model_dir)
    batch = _batch(model.config.vocab_size)  # row 2 is right-padded, its tail carries no loss
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()
    results = []
    for inputs in (batch, without_padding_mask(batch)):
        model.zero_grad()
        loss = causal_lm_chunked_loss(model, inputs, 4)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    assert "attention_mask" not in without_padding_mask(batch)
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for k, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][k], atol=1e-6), k


@pytest.mark.parametrize("on", [True, False])
def test_training_passes_right_padded_batches_without_their_mask(tiny_model_dir, tmp_path, on):
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=32, device="cpu")
    masks = []
    decoder = s.model.get_decoder()  # the chunked loss runs the decoder, then the head over loss rows
    hook = decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    rows = [{"prompt": "q " * (1 + i % 7), "completion": f"a{i}"} for i in range(16)]  # lengths differ: padding
    try:
        r = s.train("m", rows, {"max_steps": 3, "batch_size": 4, "group_by_length": False, "causal_mask_only": on,
                                "seed": 1, "warmup": 0, "padding_free": False})
    finally:
        hook.remove()
    assert r.record["status"] == "completed" and len(masks) >= 3
    assert all(m is None for m in masks) if on else any(m is not None and int(m.min()) == 0 for m in masks)


def test_the_final_evaluation_runs_without_the_optimizer_state(tiny_model_dir, tmp_path, monkeypatch):
    """A completed run frees AdamW's moments before its final evaluation (no step follows); a run that
    evaluates along the way keeps them until training ends."""
    from transformers import Trainer

    from ft_magics import Session

    seen = []
    real = Trainer.evaluate

    def evaluate(self, *a, **kw):
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        seen.append(sum(t.numel() for st in inner.state.values() for t in st.values() if torch.is_tensor(t)))
        return real(self, *a, **kw)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    rows = [{"prompt": f"question {i}", "completion": f"answer {i % 3}"} for i in range(16)]
    s = Session(adapters_dir=tmp_path / "opt")
    s.load(str(tiny_model_dir), bits=16, device="cpu")
    from ft_magics.core.events import EvalEnd, Listener

    class Evals(Listener):
        def __init__(self):
            self.steps = []

        def on_eval(self, e: EvalEnd):
            self.steps.append(e.step)

    evals = Evals()
    r = s.train("x", rows, {"max_steps": 4, "batch_size": 4, "seed": 1}, eval_data=rows[:4], listeners=[evals])
    assert r.record["status"] == "completed" and r.eval_loss is not None
    assert seen == [0]  # one evaluation, after the last step: the moments are freed
    assert evals.steps == [4]  # and reported once
    # with eval_steps the Trainer evaluates the last step itself (moments alive): that evaluation is the
    # final one, with no second pass and no second report
    seen.clear()
    evals = Evals()
    r = s.train("y", rows, {"max_steps": 4, "batch_size": 4, "seed": 1, "eval_steps": 2}, eval_data=rows[:4],
                listeners=[evals])
    assert r.record["status"] == "completed" and len(seen) == 2 and all(seen) and evals.steps == [2, 4]
    assert r.eval_loss == r.record["eval_history"][-1][1] and [s for s, _ in r.record["eval_history"]] == [2, 4]


def _packed(b, length, seed):
    """Rows of examples of random lengths packed one after another, then a padding run of its own (as
    core.data.collate_packed makes them): position_ids, the documents and transformers' boolean mask."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        pos = []
        while len(pos) < length - 5:
            pos += list(range(int(torch.randint(3, 30, (), generator=g))))
        rows.append(pos[:length - 5] + list(range(5)))
    pos = torch.tensor(rows)
    start = torch.ones(b, length, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    docs, at = start.cumsum(1), torch.arange(length)
    return pos, ((docs[:, :, None] == docs[:, None, :]) & (at[:, None] >= at[None, :]))[:, None]


@pytest.mark.parametrize("layout", ["blocks", "rows"])
@pytest.mark.parametrize("length, block", [(40, 16), (150, 64)])
def test_packed_rows_take_the_block_attention_within_their_examples(length, block, layout, monkeypatch):
    """A mask that is exactly causal attention within each example of packed rows (boolean or additive) is
    computed here, equal to SDPA with that mask in fp64, output and gradients, by blocks within the rows and
    with each example as a row of its own; a mask that hides anything more, or no position_ids to check it
    against, goes to SDPA."""
    import torch.nn.functional as F

    from ft_magics.core import speed

    monkeypatch.setattr(speed, "ATTENTION_BLOCK_ROWS", block)
    monkeypatch.setattr(speed, "DOCUMENT_ROWS", layout == "rows")
    speed._LAYOUTS.clear()
    torch.manual_seed(0)
    b, kv, groups, dim = 2, 2, 3, 8
    pos, mask = _packed(b, length, seed=1)
    q = torch.randn(b, kv * groups, length, dim, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, kv, length, dim, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def fallback(*a, **kw):
        return "sdpa", None

    def ours(m, **kw):
        return speed.causal_grouped_attention(_Attention(groups), q, k, v, m, scaling=0.3, fallback=fallback, **kw)[0]

    out = ours(mask, position_ids=pos)
    assert torch.is_tensor(out)
    assert bool(speed._LAYOUTS) == (layout == "rows")  # the layout this forward took
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         attn_mask=mask, scale=0.3).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.allclose(got, want, atol=1e-12)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill_(~mask, torch.finfo(torch.float64).min)
    assert torch.allclose(ours(additive, position_ids=pos), ref, atol=1e-12)
    hides_more = mask.clone()
    hides_more[1, 0, length - 9, length - 10] = False  # inside an example: not what the documents say
    assert mask[1, 0, length - 9, length - 10] and ours(hides_more, position_ids=pos) == "sdpa"
    assert ours(mask) == "sdpa"  # nothing to check the mask against
    assert ours(mask, position_ids=torch.arange(length)[None]) == "sdpa"  # one example: this mask is not that


def test_packed_training_runs_through_the_document_attention(tiny_model_dir, tmp_path):
    """packing: true on the CPU trains through ft_magics' attention with the packed rows' documents, and
    the run learns; the check leaves nothing cached after the step."""
    from ft_magics import Session
    from ft_magics.core import speed

    real, seen = speed.packed_documents, []

    def recording(*a, **kw):
        docs = real(*a, **kw)
        seen.append(docs is not None and int(docs[:, -1].max()) > 1)  # several examples in a row
        return docs

    rows = [{"prompt": f"question {i}", "completion": f"answer {i % 3}"} for i in range(24)]
    s = Session(adapters_dir=tmp_path / "pk")
    s.load(str(tiny_model_dir), bits=16, device="cpu")
    speed.packed_documents = recording
    try:
        r = s.train("x", rows, {"max_steps": 3, "batch_size": 2, "seed": 1, "packing": True, "max_seq_len": 64,
                                "learning_rate": 1e-2})
    finally:
        speed.packed_documents = real
    assert r.record["status"] == "completed"
    assert seen and all(seen), seen
    losses = [l for _, l in r.record["loss_history"]]
    assert losses[-1] < losses[0], losses
    assert not speed._PACKED_CHECKS and not speed._LAYOUTS


def test_a_block_of_packed_rows_multiplies_only_the_keys_of_its_own_documents():
    """Keys before the first document of a block of queries are not read: a packed row of n examples costs
    what the examples cost apart (the fp64 tests above check the values)."""
    from ft_magics.core.speed import _block_scores

    lengths = [40, 25, 60, 35]  # one packed row of four examples, 160 tokens
    docs = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    q, k = torch.randn(1, 160 * 2, 8), torch.randn(1, 160, 8)  # one key/value head, two query heads per group
    seen = [(s, e, k0, tuple(scores.shape)) for s, e, k0, scores in _block_scores(q, k, 0.5, 16, 2, docs)]
    assert [s for s, *_ in seen] == list(range(0, 160, 16))
    for s, e, k0, shape in seen:
        assert k0 == max(st for st in starts if st <= s)  # where the block's first query's example begins
        assert shape == (1, (e - s) * 2, e - k0)
    assert sum(shape[2] for *_, shape in seen) < 0.6 * sum(e for _, e, _, _ in seen)
    two_rows = torch.cat([docs, torch.cat([torch.full((100,), 1), torch.full((60,), 2)])[None]])
    q2, k2 = torch.randn(2, 160 * 2, 8), torch.randn(2, 160, 8)
    firsts = {s: k0 for s, _, k0, _ in _block_scores(q2, k2, 0.5, 16, 2, two_rows)}
    assert firsts[96] == 0 and firsts[112] == 65 and firsts[128] == 100  # the earliest over the rows


def _varied_features(vocab: int, lengths, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})  # a prompt, then the answer
    return feats


def test_a_mostly_padding_batch_runs_as_one_row_with_the_padded_loss_and_gradients(tiny_model_dir, monkeypatch):
    """padding_free: a batch whose rows would be over 8% padding is one row of its examples (positions restart,
    each example's first label is no target); the model's loss and every gradient equal the padded batch's, and
    ft_magics' attention takes each example as a row of its own. A batch of equal lengths stays padded."""
    from transformers import AutoTokenizer

    from ft_magics.core import speed
    from ft_magics.core.training import CountingCollator

    model = _lora_model(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    feats = _varied_features(model.config.vocab_size, [30, 5, 17, 9])
    padded_collator, flat_collator = CountingCollator(tok), CountingCollator(tok)
    flat_collator.padding_free = True
    padded, flat = padded_collator(feats), flat_collator(feats)
    assert tuple(padded["input_ids"].shape) == (4, 30) and "position_ids" not in padded
    assert tuple(flat["input_ids"].shape) == (1, 61) and "attention_mask" not in flat
    assert flat["position_ids"][0].tolist() == [p for n in (30, 5, 17, 9) for p in range(n)]
    starts = [0, 30, 35, 52]
    assert all(flat["labels"][0, s] == -100 for s in starts)
    assert flat_collator.loss_tokens == padded_collator.loss_tokens

    calls = []
    real = speed.attention_by_documents
    monkeypatch.setattr(speed, "attention_by_documents", lambda *a: calls.append(a[-1]) or real(*a))
    results = []
    for batch in (padded, flat):
        model.zero_grad(set_to_none=True)
        inputs = speed.without_padding_mask(batch)
        with speed.attention_for(inputs, model):
            loss = speed.causal_lm_chunked_loss(model, inputs)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (ref, ref_grads), (got, grads) = results
    assert calls and [n for _, n, _ in calls[0].groups] and not speed._LAYOUTS  # rows of their own, nothing kept
    assert sorted(w for _, _, w in calls[0].groups)[-1] == 30
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (got.item(), ref.item())
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name

    even = _varied_features(model.config.vocab_size, [20, 20, 19])  # 1.7% padding: padded as it was
    assert "position_ids" not in flat_collator(even) and flat_collator(even)["input_ids"].shape[0] == 3


def test_padding_free_training_runs_the_padded_runs_steps(tiny_model_dir, tmp_path):
    """Through a whole run on examples of widely different lengths: padding_free gives the same losses as the
    padded run step by step (the same examples in each step); it applies only where the attention keeps the
    examples of a row apart at their own cost (not eager attention, not SDPA on CUDA)."""
    from ft_magics import Session
    from ft_magics.core.data import padding_free_attention

    rows = [{"prompt": f"question {i} " + "word " * (i * 7 % 40), "completion": f"answer {i}"} for i in range(24)]
    s = Session(adapters_dir=tmp_path / "pf")
    s.load(str(tiny_model_dir), bits=32, device="cpu")
    losses, flattened = {}, {}
    for flag in (True, False):
        from ft_magics.core import training

        real = training.CountingCollator.__call__
        seen = []

        def recording(self, features, real=real, seen=seen):
            out = real(self, features)
            seen.append("position_ids" in out)
            return out

        training.CountingCollator.__call__ = recording
        try:
            r = s.train(f"pf-{flag}", rows, {"max_steps": 4, "batch_size": 6, "seed": 3, "padding_free": flag,
                                             "learning_rate": 1e-2, "group_by_length": False})
        finally:
            training.CountingCollator.__call__ = real
        assert r.record["status"] == "completed" and r.record["settings"]["padding_free"] is flag
        losses[flag], flattened[flag] = [l for _, l in r.record["loss_history"]], seen
    assert any(flattened[True]) and not any(flattened[False])
    assert len(losses[True]) == 4
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) < 1e-4 * max(abs(b), 1.0), losses
    model = s.model
    assert padding_free_attention(model, "cpu") and not padding_free_attention(model, "cuda")
    model.config._attn_implementation = "eager"
    try:
        assert not padding_free_attention(model, "cpu")
    finally:
        model.config._attn_implementation = "sdpa"


def test_padding_free_stays_off_for_a_model_that_lets_a_rows_examples_mix(tiny_model_dir, tmp_path, monkeypatch):
    """A model whose forward lets joined examples see each other (the isolation check packing uses says so)
    trains on padded batches, and the run says why."""
    from ft_magics import Session
    from ft_magics.core import data, training
    from ft_magics.core.events import Listener, Message

    monkeypatch.setattr(data, "check_packing_isolation", lambda model, tok: (False, "leaky"))
    seen, notes = [], []
    real = training.CountingCollator.__call__
    monkeypatch.setattr(training.CountingCollator, "__call__",
                        lambda self, f: seen.append(self.padding_free) or real(self, f))

    class Notes(Listener):
        def on_message(self, ev: Message) -> None:
            notes.append(ev.text)

    rows = [{"prompt": f"question {i} " + "word " * (i * 7 % 40), "completion": f"answer {i}"} for i in range(12)]
    s = Session(adapters_dir=tmp_path / "pf")
    s.load(str(tiny_model_dir), bits=32, device="cpu")
    r = s.train("leaky", rows, {"max_steps": 2, "batch_size": 6, "group_by_length": False}, listeners=[Notes()])
    assert r.record["status"] == "completed"
    assert seen and not any(seen)
    assert any("padding_free: off" in n and "leaky" in n for n in notes), notes
