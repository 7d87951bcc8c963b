#!/usr/bin/env bash
# The CUDA checks as one prepared run, for a machine with a GPU (CI has none; these paths are skipped there).
#
#   benchmarks/cuda_check.sh OUTDIR [STAGES]      STAGES: a comma list of tests, shapes, bench (default all three)
#
# tests: what the GPU sees (nvidia-smi, library versions) and every test marked `gpu` (4-bit and 16-bit
#        training on CUDA through the magics, fused LoRA against PEFT on a 4-bit CUDA base, generate-then-train,
#        VRAM handed back on unload).
# shapes: benchmarks/cuda_shapes.py: what a step pays the first time it meets a batch shape, and which
#        attention backend or padding removes it (shapes.json).
# bench: benchmarks/bench_training.py in its CUDA mode (BENCH_DEVICE=cuda): reference recipe vs ft_magics on
#        the demo model, peak allocated VRAM, the bf16 matmul peak of this GPU; BENCH_SAMPLE=1 samples the stack
#        in slow steps (raw_cuda.tgz: each side's raw JSON).
# Everything lands in OUTDIR (at most 7 files): env.txt, pytest_gpu.txt, shapes.json, bench.txt,
# bench_training_cuda.{json,md,png}, raw_cuda.tgz. Needs the project's dependencies importable by $PYTHON
# (python3); scripts/gpu_bundle.sh makes wheels and the demo GGUF travel to a machine that has only torch.
set -u
OUT_DIR=${1:?usage: benchmarks/cuda_check.sh OUTDIR [tests,shapes,bench]}
WHAT=${2:-tests,shapes,bench}
[ "$WHAT" = all ] && WHAT=tests,shapes,bench
has() { case ",$WHAT," in *",$1,"*) return 0;; esac; return 1; }
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
    echo "cuda_check: torch sees no CUDA GPU here (torch.cuda.is_available() is False); nothing to check"; exit 2; }

if has tests; then
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| bf16", torch.cuda.is_bf16_supported(), "|", torch.cuda.get_device_name(0))
for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pyarrow", "IPython", "ipywidgets"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001 - report, do not stop: the tests say what it breaks
        print(f"{name} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
EOF
    } > "$OUT_DIR/env.txt" 2>&1
    cat "$OUT_DIR/env.txt"
    timeout "${TESTS_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests > "$OUT_DIR/pytest_gpu.txt" 2>&1
    rc=$?
    echo "pytest -m gpu: exit $rc" >> "$OUT_DIR/pytest_gpu.txt"
    tail -n 15 "$OUT_DIR/pytest_gpu.txt"
    [ $rc -eq 0 ] || status=1
fi

if has shapes; then
    timeout "${SHAPES_TIMEOUT:-200}" "$PY" benchmarks/cuda_shapes.py --device cuda --out "$OUT_DIR/shapes.json" \
        > /tmp/cuda_shapes.txt 2>&1
    echo "cuda_shapes: exit $?" >> /tmp/cuda_shapes.txt
    cat /tmp/cuda_shapes.txt
fi

if has bench; then
    BENCH_DEVICE=cuda timeout "${BENCH_TIMEOUT:-480}" "$PY" benchmarks/bench_training.py > "$OUT_DIR/bench.txt" 2>&1
    rc=$?
    echo "bench_training (cuda): exit $rc" >> "$OUT_DIR/bench.txt"
    cat "$OUT_DIR/bench.txt"
    for f in benchmarks/results/bench_training_cuda.json benchmarks/results/bench_training_cuda.md \
             benchmarks/results/bench_training_cuda.png; do
        [ -f "$f" ] && cp "$f" "$OUT_DIR/"
    done
    # each side's raw JSON (sampled stacks included) and logs, also where a side failed or the bench timed out
    tar czf "$OUT_DIR/raw_cuda.tgz" benchmarks/results/raw_cuda-* 2>/dev/null
    [ $rc -eq 0 ] || status=1
fi
exit $status
