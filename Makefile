# Two entry points for a fresh machine (see README, Quick start). Everything installs from constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo

.PHONY: setup demo test lint bench clean

# The venv is rebuilt only when the pins or the package metadata change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in data: train the seed VAE, then say where everything went.
demo: $(STAMP)
	$(BIN)/vaeforge train --output $(DEMO)/train --epochs 2 --max-samples 2048 --overwrite
	$(BIN)/vaeforge generate --checkpoint $(DEMO)/train --count 2000 --shard-size 500 \
		--output $(DEMO)/shards --overwrite
	@echo
	@echo "demo outputs:"
	@echo "  run directory     $(DEMO)/train  (run.json, metrics.jsonl)"
	@echo "  checkpoints       $(DEMO)/train/checkpoints"
	@echo "  sample pictures   $(DEMO)/train/samples/samples_epoch0002.png"
	@echo "  reconstructions   $(DEMO)/train/samples/recon_epoch0002.png"
	@echo "  synthetic shards  $(DEMO)/shards/samples-00000{0..3}.tar  (+ _manifest.json, _SUCCESS)"

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The whole suite: formatting, lint, then every test.
test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
