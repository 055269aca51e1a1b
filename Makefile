# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel of 2.13.0 is on local disk; any other request pulls CUDA.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	@# DeepSpeed compiles its CPU comm op on first use (~1 min): do it now, not silently in the first run
	-DS_ACCELERATOR=cpu $(BIN)/python -m flashctl.distill.ops || echo "DeepSpeed op build skipped; runs use gloo allreduce"
	touch $(STAMP)

# The embedded default end to end: shapes data (with cached conditioning), a task-mixture grid of
# two DMD2 distillations (2-rank ZeRO-3 on CPU; the 5:5 cell is the embedded default itself),
# evaluation of student vs teacher, MLflow in ./mlflow.db.
demo: $(STAMP)
	$(BIN)/flashctl prepare-data experiments/tiny-cpu.yaml --overwrite --workers 2 --cache-embeddings
	$(BIN)/flashctl ablate experiments/tiny-cpu.yaml --factor task-mixture --levels t2i-only,5:5 --resume
	$(BIN)/flashctl report --experiment flashctl-tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/python -m ruff check flashctl tests bench

bench: $(STAMP)
	$(BIN)/python bench/prepare_data.py
	$(BIN)/python bench/distill_step.py

clean:
	rm -rf runs data mlflow.db mlartifacts reports
