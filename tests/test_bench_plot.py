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
