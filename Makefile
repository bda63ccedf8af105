# Quick start: `make demo` and `make test`. Both create .venv and install what is missing first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PIP_ARGS ?=

.PHONY: install demo test test-cluster lint format lock benchmarks clean wheelhouse install-offline

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pinned by constraints.txt)"
	$(PY) -m pip install --quiet $(PIP_ARGS) -c constraints.txt -e '.[dev,server]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo --config configs/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# --durations: the slowest tests are listed at the end, to keep the suite quick
test: lint
	$(PY) -m pytest -m "not cluster" --durations=15

# Multi-process clusters and services: PostgreSQL (its server binaries; .ci/run installs them), S3 + MLflow server
# + Ray, a two-node Ray cluster losing a node, Ray Train losing a worker, `ray job submit`, a Dask scheduler and
# workers losing a worker, MLflow with accounts, Dask over TLS, concurrent jobs, the cohort report in Chromium
# (.ci/run installs it).
test-cluster: $(STAMP)
	$(PY) -m pytest -m cluster --durations=5

benchmarks: $(STAMP)
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.border_ablation

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/' > constraints.body
	@{ sed -n '1,/^# torch is/p' constraints.txt; cat constraints.body; } > constraints.new && rm constraints.body
	mv constraints.new constraints.txt

# Air-gapped GPU nodes (README): every wheel needed at run time except PyTorch's, for Linux x86-64, cp311 and cp312.
WHEELHOUSE ?= wheelhouse

wheelhouse: $(STAMP)
	$(PY) scripts/wheelhouse.py "$(WHEELHOUSE)"

# Into the environment of PYTHON (the python3 on PATH: the node's venv or conda env with CUDA torch, not .venv),
# from the wheelhouse alone. Checks come first, so a wrong PYTHON or folder costs one line.
install-offline:
	@$(PYTHON) -c 'import torch' 2>/dev/null || { echo "install-offline: $(PYTHON) cannot import torch: install PyTorch (CUDA build) into it first" >&2; exit 1; }
	@test -f "$(WHEELHOUSE)/constraints.txt" || { echo "install-offline: $(WHEELHOUSE) is not a wheelhouse (no constraints.txt): make wheelhouse WHEELHOUSE=DIR" >&2; exit 1; }
	$(PYTHON) -m pip install --no-index --find-links "$(WHEELHOUSE)" -c "$(WHEELHOUSE)/constraints.txt" 'unet-wsi[server]'

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
