# The two set-up commands of the README. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=15

.PHONY: demo demo-search test venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,deploy,search,tracking,quant]'
	touch $(STAMP)

# Synthetic data -> train -> test -> pictures -> HTML report, all on the CPU (about 2-3 minutes).
demo: $(STAMP) data/synthetic/synthetic.json
	rm -rf runs/demo  # the demo always starts afresh; train refuses to overwrite a run otherwise
	$(BIN)/strongreid train --config configs/demo.yml
	$(BIN)/strongreid test --config configs/demo.yml TEST.WEIGHT runs/demo/best.pt
	$(BIN)/python benchmarks/histogram_baseline.py --root data/synthetic --out runs/demo/histogram_baseline.json --compare runs/demo/results.json
	$(BIN)/strongreid visualize --results runs/demo
	$(BIN)/strongreid report --results runs/demo

# After `make demo` (needs the search extra): synthetic footage -> Milvus Lite gallery, then
# prints the `strongreid serve` command that opens the search page (docs/search.md).
demo-search: $(STAMP)
	$(BIN)/strongreid demo search --model runs/demo/best.pt

data/synthetic/synthetic.json: | $(STAMP)
	rm -rf data/synthetic
	$(BIN)/strongreid synth --out data/synthetic

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf data/synthetic runs/demo
