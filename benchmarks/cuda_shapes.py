"""What a training step pays the first time it meets a batch shape, and what removes it.

    python benchmarks/cuda_shapes.py [--device cuda|cpu] [--out FILE.json]

The H200 run of 2026-11-29 (benchmarks/recorded/h200-2026-11-29) saw steps of 0.3-0.5 s, and 2-4 s more on
every step whose batch had a shape the process had not met before - both on the reference recipe and on
ft_magics. Length-grouped batches meet more distinct shapes than random ones, so there the cost decides the
speed. This script trains a demo-shaped model (SmolLM2-135M's layout, random weights, NF4 4-bit, LoRA r=16
on every linear layer, AdamW) in plain PyTorch steps over a sequence of batch lengths, new and repeated, each
variant in its own process (the per-shape caches are per process):

- ``default``: PyTorch's SDPA choice;
- ``no_cudnn_sdp``: the cuDNN attention backend switched off;
- ``eager``: transformers' eager attention (no SDPA);
- ``fused``: default, with ft_magics' fused LoRA layers;
- ``pad64``: default, with every batch padded to a multiple of 64 tokens (few distinct shapes).

It prints each step's time, first-met vs repeated means, and for ``default`` the torch.profiler's top ops
of one first-met step. Results as JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [136, 200, 136, 264, 200, 328, 392, 264, 456, 136, 520, 392]  # new and repeated shapes
BATCH = 8
VARIANTS = ("default", "no_cudnn_sdp", "fused", "pad64")  # and "eager": transformers' own attention


def demo_shaped_folder(folder: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    if (folder / "config.json").exists():
        return folder
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(folder))
    return folder


def worker(variant: str, folder: str, device: str, profile: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from ft_magics.core.fused_lora import fused_lora
    from ft_magics.core.loading import NO_HUB_KERNELS, quantization_config

    if variant == "no_cudnn_sdp" and device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    kw = {"attn_implementation": "eager"} if variant == "eager" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device},
                                                 quantization_config=quantization_config(4, torch.bfloat16), **kw,
                                                 **NO_HUB_KERNELS)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def batch(length):
        if variant == "pad64":
            length = -(-length // 64) * 64
        ids = torch.randint(0, 49152, (BATCH, length), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(1, BATCH, 2):  # half the rows padded: the attention mask is real
            mask[row, length - length // 3:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        return ids.to(device), mask.to(device), labels.to(device)

    def step(length):
        ids, mask, labels = batch(length)
        with fused_lora(pm, variant == "fused"):
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step(72)  # libraries' one-time set-up outside the timed steps
    sync()
    seen, rows = set(), []
    for length in LENGTHS:
        key = -(-length // 64) * 64 if variant == "pad64" else length
        first = key not in seen
        seen.add(key)
        t0 = time.perf_counter()
        step(length)
        sync()
        rows.append({"length": length, "first": first, "s": round(time.perf_counter() - t0, 4)})
    out = {"variant": variant, "steps": rows,
           "first_mean_s": _mean([r["s"] for r in rows if r["first"]]),
           "repeat_mean_s": _mean([r["s"] for r in rows if not r["first"]])}
    if device == "cuda":
        out["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with prof(activities=acts) as p:
            step(584)  # a shape not met before
            sync()
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
        out["profile_first_step"] = table
        with prof(activities=acts) as p:
            step(584)  # the same shape again
            sync()
        out["profile_repeat_step"] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                             max_name_column_width=60)
    return out


def _mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker")  # internal: variant name
    ap.add_argument("--folder")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.folder, a.device, a.profile)), flush=True)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = demo_shaped_folder(Path(tmp) / "demo-shaped", a.layers)
        for v in a.variants.split(","):
            cmd = [sys.executable, __file__, "--worker", v, "--folder", str(folder), "--device", a.device]
            if v == "default":
                cmd.append("--profile")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                res = {"variant": v, "error": (proc.stderr or proc.stdout)[-2000:]}
            else:
                res = json.loads(line[len("RESULT "):])
            res["process_s"] = round(time.perf_counter() - t0, 1)
            results.append(res)
            steps = " ".join(f"{r['length']}{'*' if r['first'] else ''}:{r['s']:.3f}" for r in res.get("steps", []))
            print(f"{v:13s} first-met {res.get('first_mean_s')} s, repeated {res.get('repeat_mean_s')} s "
                  f"(process {res['process_s']} s; peak VRAM {res.get('peak_vram_gb')} GB)\n    {steps}"
                  + (f"\n    ERROR {res['error'][-600:]}" if "error" in res else ""), flush=True)
    for res in results:
        for key in ("profile_first_step", "profile_repeat_step"):
            if key in res:
                print(f"== {res['variant']}: {key}\n{res[key]}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
