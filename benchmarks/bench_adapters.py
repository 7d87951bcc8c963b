"""Adapter swap latency on the demo model (SmolLM2-135M-Instruct): the seed's edge pattern, measured.

    .venv/bin/python benchmarks/bench_adapters.py [--bits 4] [--reps 30]

Rank-16 adapters on every linear layer (all-linear: 30 layers x 7 projections = 210 LoRA pairs) are
made with plain peft and saved in PEFT's format. Then, through the Session API:
  warm swap  - Session.use(NAME) between two adapters already in memory (goal p50 < 1 ms)
  cold load  - the router loading an adapter from disk that is not in memory, into a slot whose previous
               adapter it evicts (PEFT hotswap_adapter: integrity check, read safetensors, copy into the
               slot's tensors; goal p50 < 50 ms). This is the per-request path of the edge pattern.
  new slot   - Session.load_adapter(PATH): an adapter added beside the others (PEFT creates 210 LoRA
               modules); reported for comparison, it is what the first request for each slot costs
  routing    - one mixed batch (base + 3 adapters, one generate call, PEFT adapter_names per row)
Results: printed, and benchmarks/results/bench_adapters.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def pct(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def make_adapters(session, root: Path, n: int) -> list:
    """n rank-16 all-linear adapters with random (non-zero) weights, saved by plain peft."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = session.handle.model
    paths = []
    pm = None
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                         task_type="CAUSAL_LM")
        name = f"task{i}"
        if pm is None:
            pm = get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        pm.save_pretrained(str(root / "_peft"), selected_adapters=[name])
        src = root / "_peft" / name if (root / "_peft" / name).is_dir() else root / "_peft"
        src.rename(root / name)
        paths.append(root / name)
    session.handle.model = pm.unload()  # the plain base again, LoRA layers removed
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8, 16, 32))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--model", default="demo")
    a = ap.parse_args(argv)
    import torch

    from ft_magics import Session

    torch.set_num_threads(min(4, torch.get_num_threads()))
    t0 = time.perf_counter()
    s = Session(adapters_dir=tempfile.mkdtemp(prefix="bench-adapters-"))
    s.load(a.model, bits=a.bits)
    load_s = time.perf_counter() - t0
    store = Path(s.adapters_dir)
    paths = make_adapters(s, store, 4)
    size = sum(f.stat().st_size for f in paths[0].iterdir())

    from ft_magics.core.routing import AdapterRouter

    # new slot: Session.load_adapter, unloaded again between reps (task0 stays as an anchor so every rep
    # is the same "add one more adapter" operation rather than wrapping the base in PEFT)
    s.load_adapter(paths[0], "task0")
    new_slot = []
    for _ in range(max(3, a.reps // 3)):
        t = time.perf_counter()
        s.load_adapter(paths[1], "task1")
        new_slot.append((time.perf_counter() - t) * 1000.0)
        s.unload_adapter("task1")
    # cold load: one router slot, alternately filled from disk with task2 and task3 (each load evicts)
    router = AdapterRouter(s, store, capacity=1)
    router._ensure("task2", set())
    cold, hows = [], set()
    for i in range(a.reps):
        _, ms, how = router._ensure("task3" if i % 2 == 0 else "task2", set())
        cold.append(ms)
        hows.add(how)
    assert hows == {"hot-swapped"}, hows
    router._drop(next(iter(router._slots)))
    s.use("task0")
    # warm swap: both adapters in memory
    s.load_adapter(paths[1], "task1")
    warm, warm_wall = [], []
    for i in range(a.reps * 10):
        t = time.perf_counter()
        ms = s.use("task0" if i % 2 else "task1")
        warm_wall.append((time.perf_counter() - t) * 1000.0)
        warm.append(ms)
    base_swap = []
    for i in range(a.reps * 10):
        t = time.perf_counter()
        s.use("base" if i % 2 else "task0")
        base_swap.append((time.perf_counter() - t) * 1000.0)
    # per-request routing: one mixed batch, adapters loaded on demand from the store
    s.unload_adapter("task1")
    reqs = [("base", "What is LoRA?"), ("task1", "Reset my password"), ("task2", "Track my order"),
            ("task0", "Is it raining?")]
    served = s.serve(reqs, store=store, capacity=2, max_new_tokens=8)
    result = {
        "model": s.handle.name, "bits": a.bits, "device": s.handle.device, "dtype": str(s.handle.dtype),
        "model_load_s": round(load_s, 2), "adapter": "r=16 all-linear (210 LoRA pairs)",
        "adapter_bytes": size, "reps": a.reps, "torch_threads": torch.get_num_threads(),
        "warm_swap_ms": {"p50": pct(warm, 0.5), "p90": pct(warm, 0.9), "goal_p50": 1.0},
        "warm_swap_session_use_ms": {"p50": pct(warm_wall, 0.5), "p90": pct(warm_wall, 0.9)},
        "swap_to_base_ms": {"p50": pct(base_swap, 0.5)},
        "cold_load_ms": {"p50": pct(cold, 0.5), "p90": pct(cold, 0.9), "min": min(cold), "goal_p50": 50.0,
                         "path": "router slot, PEFT hotswap_adapter from disk"},
        "new_slot_load_ms": {"p50": pct(new_slot, 0.5), "p90": pct(new_slot, 0.9),
                             "path": "Session.load_adapter (PEFT load_adapter, low_cpu_mem_usage)"},
        "routing": [{"adapter": r.adapter, "mode": r.mode, "cold": r.cold, "load_ms": round(r.load_ms, 1),
                     "how": r.how, "tokens": r.new_tokens} for r in served],
        "routing_batch_s": round(served[0].batch_seconds, 2),
    }
    print(f"adapter swap benchmark: {result['model']} {a.bits}-bit on {result['device']}, "
          f"rank-16 all-linear adapter ({size / 1e6:.1f} MB), {a.reps} reps")
    print(f"  warm swap (activate)      p50 {result['warm_swap_ms']['p50']:.3f} ms  "
          f"p90 {result['warm_swap_ms']['p90']:.3f} ms   goal < 1 ms   "
          f"{'OK' if result['warm_swap_ms']['p50'] < 1 else 'MISSED'}")
    print(f"  warm swap (Session.use)   p50 {result['warm_swap_session_use_ms']['p50']:.3f} ms")
    print(f"  swap to base              p50 {result['swap_to_base_ms']['p50']:.3f} ms")
    print(f"  cold load (from disk)     p50 {result['cold_load_ms']['p50']:.1f} ms  "
          f"p90 {result['cold_load_ms']['p90']:.1f} ms   goal < 50 ms   "
          f"{'OK' if result['cold_load_ms']['p50'] < 50 else 'MISSED'}   (hot-swap into a router slot)")
    print(f"  new slot (load_adapter)   p50 {result['new_slot_load_ms']['p50']:.1f} ms  "
          f"(first load of a slot: PEFT creates the LoRA modules)")
    print(f"  routing: 4 requests, 3 adapters + base, capacity 2 -> one "
          f"{served[0].mode} batch in {result['routing_batch_s']} s")
    for r in served:
        print(f"    {r.adapter:<6} {r.mode:<7} {r.how:<11} load {r.load_ms:6.1f} ms  "
              f"{r.new_tokens} tokens  {r.text[:40]!r}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_adapters.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
