# The two set-up commands of the README. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=15

.PHONY: demo demo-search demo-adapt test venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,deploy,search,tracking,quant,adapt,clip]'
	touch $(STAMP)

# Synthetic data -> train -> test -> pictures -> HTML report, all on the CPU (about 3-7 minutes).
# `make demo DEMO_CONFIG=configs/demo_bot.yml DEMO_RUN=runs/demo_bot` runs the same steps with
# the paper's recipe (benchmarks/demo_endtoend.sh compares the two).
DEMO_CONFIG ?= configs/demo.yml
DEMO_RUN ?= runs/demo
demo: $(STAMP) data/synthetic/synthetic.json
	rm -rf $(DEMO_RUN)  # the demo always starts afresh; train refuses to overwrite a run otherwise
	$(BIN)/strongreid train --config $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_RUN)
	$(BIN)/strongreid test --config $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_RUN) TEST.WEIGHT $(DEMO_RUN)/best.pt
	$(BIN)/python benchmarks/histogram_baseline.py --root data/synthetic --out $(DEMO_RUN)/histogram_baseline.json --compare $(DEMO_RUN)/results.json
	$(BIN)/strongreid visualize --results $(DEMO_RUN)
	$(BIN)/strongreid report --results $(DEMO_RUN)

# After `make demo` (needs the search extra): synthetic footage -> gallery file, then
# prints the `strongreid serve` command that opens the search page (docs/search.md).
demo-search: $(STAMP)
	$(BIN)/strongreid demo search --model runs/demo/best.pt

# After `make demo`: night footage -> tracklets -> adaptation of runs/demo/best.pt without labels
# -> both models tested on the night test split -> calibration -> gallery, then prints the
# `strongreid serve` command; writes runs/demo-adapt/results.json (docs/adaptation.md).
demo-adapt: $(STAMP)
	$(BIN)/python benchmarks/demo_adapt.py

data/synthetic/synthetic.json: | $(STAMP)
	rm -rf data/synthetic
	$(BIN)/strongreid synth --out data/synthetic

test: $(STAMP)
	$(BIN)/lint-imports && $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf data/synthetic runs/demo
