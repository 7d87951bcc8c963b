"""benchmarks/bench_training.py's picture: loss over training time and speed/memory bars per dataset."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_draws_every_side_of_every_dataset(tmp_path):
    import matplotlib.image

    bench = _bench()
    rows = []
    for d in ("support", "varlen"):
        for side, secs in (("reference", 40.0), ("ft_magics", 20.0)):
            run = dict(dataset=d, side=side, train_seconds=secs, losses=[4.0, 3.5, 3.2, 3.0],
                       loss_tokens_per_s=100.0 if side == "reference" else 200.0, peak_rss_bytes=2**30)
            if side == "ft_magics":  # timed steps; the reference row falls back to an even spread
                run["step_seconds"] = [4.0, 9.0, 15.0, 20.0]
            rows.append(run)
    out = bench.plot(rows, tmp_path / "b.png")
    assert out == tmp_path / "b.png"
    img = matplotlib.image.imread(out)
    assert img.shape[0] > img.shape[1] * 0.5  # two rows of panels: one per dataset
    assert img.shape[1] >= 900


def test_assemble_reports_the_raw_results_there_and_runs_nothing(tmp_path, monkeypatch, capsys):
    """BENCH_ASSEMBLE=1: a run cut short (a GPU machine's time limit) still gives its table from what it left."""
    import json
    import subprocess

    bench = _bench()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "ASSEMBLE", True)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran a side")))
    for side in ("reference", "ft_magics"):  # ft_magics+ckpt is missing, as after a timeout
        (tmp_path / f"raw_cuda-varlen-{side}.json").write_text(json.dumps({"dataset": "varlen", "side": side}))
    monkeypatch.setenv("BENCH_DATASETS", "varlen")
    rows = bench.run_all(20, "cuda")
    assert [r["side"] for r in rows] == ["reference", "ft_magics"]
    assert "ft_magics+ckpt  not run (no raw_cuda-varlen-ft_magics+ckpt.json)" in capsys.readouterr().out


def test_stack_sampler_names_what_the_slow_steps_wait_in():
    import sys
    import time

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from stack_sampler import StackSampler

    def ordinary_work():
        time.sleep(0.03)

    def rare_stall():
        time.sleep(0.15)

    sampler = StackSampler(interval=0.002).start()
    ends = [time.perf_counter()]
    for i in range(8):
        ordinary_work()
        if i in (3, 6):
            rare_stall()
        ends.append(time.perf_counter())
    sampler.stop()
    rep = sampler.report(ends)
    assert len(rep["slow_steps"]) == 2 and rep["samples_slow"] > 20
    top, share_slow, share_ordinary = rep["share_on_stack"][0]
    assert top.endswith(":rare_stall") and share_slow > 0.5 and share_ordinary == 0


def test_recomputed_flops_are_the_layers_forward_pass_and_the_table_shows_both_shares():
    """Gradient checkpointing runs each layer's forward twice: the hardware's share of the peak counts it,
    the model's (useful) share does not."""
    bench = _bench()
    dims = dict(body_linear_params=1000, hidden=8, layers=2, vocab=50)
    stats = dict(tokens=10, sq_len_sum=30, loss_tokens=4)
    useful = bench.useful_flops(dims, stats, lora_params=100)
    assert useful == 10 * (4 * 1000 + 6 * 100) + 6 * 8 * 2 * 30 + 4 * 50 * 8 * 4
    assert bench.recomputed_flops(dims, stats, 100) == 10 * (2 * 1000 + 2 * 100) + 2 * 8 * 2 * 30
    row = dict(dataset="support", side="ft_magics+ckpt", loss_tokens_per_s=120.0, peak_rss_bytes=8.5e8,
               job_peak_bytes=4.8e8, train_seconds=10.0, cell_seconds=12.0, final_train_loss=3.0, eval_loss=3.1,
               padding_waste=0.05, achieved_gflops=140.0, matmul_peak_bf16_gflops=420.0, fraction_of_peak=1 / 3,
               hardware_fraction_of_peak=0.51)
    line = bench.table([row]).splitlines()[-1]
    assert line.endswith("| 33.3% | 51.0% |")
