# `make run` and `make test` do all set-up themselves from a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test setup bench bench-sd bench-tokens bench-app bench-inspect clean

$(PY):
	python3 -m venv $(VENV)

# Install torch first, pinned, only when no torch is importable (an unpinned
# torch would pull a multi-GB CUDA build); then the project and its dev extra.
$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mergestudio

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_merge.py

bench-sd: $(STAMP)
	$(PY) bench/bench_sd.py

bench-inspect: $(STAMP)
	$(PY) bench/bench_inspect.py

bench-tokens: $(STAMP)
	$(PY) bench/bench_tokens.py

bench-app: $(STAMP)
	$(PY) bench/bench_app.py

clean:
	rm -rf $(VENV) build *.egg-info
