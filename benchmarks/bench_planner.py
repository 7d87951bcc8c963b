"""Validate the memory planner (%ft_plan) against measured peaks on the demo model, in all three modes.

    .venv/bin/python benchmarks/bench_planner.py

Each mode runs in its own subprocess, on rows of exactly SEQ tokens at batch BATCH, for 3 optimizer steps
(the optimizer states exist from the first step on, so the peak is reached):
  full   - every parameter trains: fp32 weights + AdamW (16 B/param, like the planner's mixed-precision
           16 B/param), transformers.Trainer with the standard loss
  lora16 - ft_magics LoRA r=16 all-linear on the bf16 base (chunked loss)
  qlora  - ft_magics QLoRA: NF4 + double quantisation base, bf16 compute (chunked loss)
Measured: the process RSS sampled every 10 ms during training (peak), and the RSS after the imports and
before any model is loaded (the runtime overhead, used as the planner's overhead term: marked "measured").
Everything else in the prediction is the planner's formula (estimated). Goal: within 25%.
Results: benchmarks/results/bench_planner.{json,md}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_training import worker_env  # this folder is first on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEQ, BATCH, STEPS = 256, 8, 3
MODES = ("full", "lora16", "qlora")


class RssSampler:
    def __init__(self, period: float = 0.01):
        import psutil

        self.proc, self.period, self.peak, self._stop = psutil.Process(), period, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def rows(tokenizer, n: int = 40) -> list:
    """Text rows at least SEQ tokens long (truncated to exactly SEQ by max_seq_len)."""
    words = "the order was shipped to your address and the refund will follow in five business days".split()
    text = " ".join(words[i % len(words)] for i in range(SEQ * 2))
    return [{"text": f"{i} " + text} for i in range(n)]


def worker(mode: str, out: str) -> None:
    import psutil
    import torch  # noqa: F401 - the runtime is part of the overhead
    import transformers  # noqa: F401
    import peft  # noqa: F401

    overhead = psutil.Process().memory_info().rss
    from ft_magics import Session

    if mode == "full":
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

        from ft_magics.core.loading import NO_HUB_KERNELS, resolve_source

        path = resolve_source("demo")[1]
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **NO_HUB_KERNELS)  # as ft_magics loads
        enc = [tok(r["text"], truncation=True, max_length=SEQ)["input_ids"] for r in rows(tok)]
        ds = Dataset.from_list([{"input_ids": e, "labels": e} for e in enc])
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            args = TrainingArguments(output_dir=d, per_device_train_batch_size=BATCH, max_steps=STEPS, use_cpu=True,
                                     report_to="none", save_strategy="no", disable_tqdm=True, learning_rate=1e-5)
            trainer = Trainer(model=model, args=args, train_dataset=ds)
            with RssSampler() as s:
                trainer.train()
    else:
        sess = Session(adapters_dir=Path(os.environ.get("TMPDIR", "/tmp")) / f"ft_plan_bench_{os.getpid()}")
        sess.load("demo", bits=16 if mode == "lora16" else 4)
        data = rows(sess.tokenizer)
        with RssSampler() as s:
            sess.train("plan-check", data, {"format": "text", "text_field": "text", "train_on": "all",
                                             "max_seq_len": SEQ, "batch_size": BATCH, "max_steps": STEPS})
    Path(out).write_text(json.dumps({"mode": mode, "peak_rss": s.peak, "overhead_rss": overhead}))


def main() -> None:
    from ft_magics.core.planner import plan

    RESULTS.mkdir(parents=True, exist_ok=True)
    env = worker_env()
    measured = {}
    for mode in MODES:
        out = RESULTS / f"raw-planner-{mode}.json"
        if os.environ.get("BENCH_REUSE") == "1" and out.exists():  # assemble from an earlier measurement
            measured[mode] = json.loads(out.read_text())
            continue
        print(f"  {mode:7s} ...", end=" ", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(out)], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print("FAILED")
            sys.stderr.write(proc.stderr[-5000:])
            raise SystemExit(1)
        measured[mode] = json.loads(out.read_text())
        print(f"{time.perf_counter() - t:.0f} s")
    names = {"full": "full fine-tuning (bf16 + AdamW)", "lora16": "LoRA, 16-bit base",
             "qlora": "QLoRA, NF4 + double quant"}
    lines = [f"Planner vs measured peak RSS, demo model, seq {SEQ}, batch {BATCH} (GB = 1e9 B)", "",
             "| mode | weights (est.) | adapter+opt (est.) | activations (est.) | overhead (measured) | "
             "predicted | measured peak | predicted/measured | within 25% |", "|---|---|---|---|---|---|---|---|---|"]
    result = {}
    for mode in MODES:
        m = measured[mode]
        p = plan("demo", seq_len=SEQ, batch_size=BATCH, chunked_loss=(mode != "full"),
                 full_act_bytes=4, overhead_bytes=m["overhead_rss"]).mode(names[mode])
        ratio = p.total / m["peak_rss"]
        ok = abs(ratio - 1) <= 0.25
        result[mode] = dict(predicted=p.total, measured=m["peak_rss"], ratio=ratio, within_25=ok,
                            weights=p.weights, adapter_optimizer=p.adapter_optimizer, activations=p.activations,
                            overhead_measured=m["overhead_rss"])
        g = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
        lines.append(f"| {mode} | {g(p.weights)} | {g(p.adapter_optimizer)} | {g(p.activations)} | "
                     f"{g(m['overhead_rss'])} | {g(p.total)} | {g(m['peak_rss'])} | {ratio:.2f} | "
                     f"{'yes' if ok else 'NO'} |")
    text = "\n".join(lines)
    (RESULTS / "bench_planner.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "bench_planner.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
