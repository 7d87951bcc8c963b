"""Each speed/memory lever of ft_magics measured on its own (demo model, demo:support, batch 8).

    .venv/bin/python benchmarks/bench_levers.py            # LEVER_STEPS=4 by default

Runs the ft_magics side of bench_training.py (a real %%lora_train in an IPython shell, own subprocess)
with one setting changed at a time, from everything off to everything on. Results:
benchmarks/results/bench_levers.{json,md}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_training import worker_env  # this folder is first on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STEPS = int(os.environ.get("LEVER_STEPS", "4"))

# each training lever switched on in turn, in this order, on top of the ones before it
LEVERS = ["group_by_length", "chunked_loss", "autocast", "fused_lora", "lean_steps", "causal_mask_only", "heap_reuse"]
CONFIGS = [("all levers off", "\n".join(f"{k}: false" for k in LEVERS))]
CONFIGS += [(f"+ {lever}" + (" (defaults)" if i == len(LEVERS) - 1 else ""),
             "\n".join(f"{k}: false" for k in LEVERS[i + 1:])) for i, lever in enumerate(LEVERS)]
CONFIGS += [("defaults + gradient_checkpointing", "gradient_checkpointing: true")]


def micro(mode: str) -> dict:
    """The loss alone (output head + cross-entropy, forward and backward) at the demo's shapes:
    batch 8 x 256 tokens, hidden 576, vocab 49152, bf16, 45% of the positions loss-bearing."""
    import resource

    import torch

    from ft_magics.core.speed import auto_chunk_rows, chunked_cross_entropy

    torch.manual_seed(0)
    b, t, h, v = 8, 256, 576, 49152
    weight = (torch.randn(v, h) * 0.02).bfloat16()
    hidden = torch.randn(b, t, h).bfloat16()
    labels = torch.randint(0, v, (b, t))
    labels[:, :140] = -100

    def step():
        x = hidden.clone().requires_grad_()
        if mode == "standard":
            logits = (x @ weight.t()).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1))
        else:
            m = labels[:, 1:] != -100
            loss = chunked_cross_entropy(x[:, :-1][m], weight, labels[:, 1:][m], auto_chunk_rows(v))
        loss.backward()
        return loss.item()

    step()
    t0 = time.perf_counter()
    loss = [step() for _ in range(3)][-1]
    return {"mode": mode, "seconds": (time.perf_counter() - t0) / 3, "loss": loss,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = worker_env()
    micro_rows = []
    for mode in ("standard", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--micro", mode], env=env, capture_output=True, text=True,
                              check=True)
        micro_rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    micro_md = ["Loss alone (head + cross-entropy, fwd + bwd), batch 8 x 256, vocab 49152, bf16:", "",
                "| loss | s/iter | process peak RSS GB | loss value |", "|---|---|---|---|"]
    micro_md += [f"| {m['mode']} | {m['seconds']:.2f} | {m['peak_rss'] / 1e9:.2f} | {m['loss']:.4f} |"
                 for m in micro_rows]
    print("\n".join(micro_md))
    data = ROOT / "ft_magics" / "data"
    small_eval = RESULTS / "data" / "support-eval-small.jsonl"
    small_eval.parent.mkdir(parents=True, exist_ok=True)
    small_eval.write_text("".join((data / "support-eval.jsonl").read_text().splitlines(True)[:16]))
    rows, failed = [], []
    for label, body in CONFIGS:
        out = RESULTS / f"raw-lever-{len(rows)}.json"
        env = worker_env(BENCH_FT_BODY=body)
        print(f"  {label:36s} ...", end=" ", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--worker", "ft_magics",
                               "support", str(data / "support.jsonl"), str(small_eval), str(STEPS), str(out)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print("FAILED")
            sys.stderr.write(proc.stderr[-4000:])
            failed.append(label)
            continue
        r = json.loads(out.read_text())
        r["lever"] = label
        rows.append(r)
        print(f"{time.perf_counter() - t:.0f} s")
    lines = [f"Levers, demo model, demo:support, batch 8, {STEPS} steps", "",
             "| setting | loss tok/s | s/step | peak RSS GB | RSS before train GB | padding | eval loss | % bf16 peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lever']} | {r['loss_tokens_per_s']:.0f} | {r['train_seconds'] / r['steps']:.2f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['rss_before_train'] / 1e9:.2f} | "
                     f"{100 * r['padding_waste']:.0f}% | {r['eval_loss']:.4f} | {100 * r['fraction_of_peak']:.0f}% |")
    text = "\n".join(micro_md + [""] + lines)
    (RESULTS / "bench_levers.json").write_text(json.dumps({"micro": micro_rows, "runs": rows}, indent=1))
    (RESULTS / "bench_levers.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(f"levers that failed: {', '.join(failed)}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--micro":
        print(json.dumps(micro(sys.argv[2])))
    else:
        main()
