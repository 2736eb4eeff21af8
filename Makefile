# The two set-up commands: `make demo` and `make test`. Both build the venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_WORKSPACE ?= demo_workspace

.PHONY: venv test demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	rm -rf $(DEMO_WORKSPACE)
	$(BIN)/covnet_make_phantoms --workspace $(DEMO_WORKSPACE) --num-labelled 10 --num-unlabelled 4 --num-test 2 --seed 0
	$(BIN)/covnet_plan_and_preprocess --workspace $(DEMO_WORKSPACE) -np 2
	$(BIN)/covnet_evaluate --ref $(DEMO_WORKSPACE)/raw/labelsTr --pred $(DEMO_WORKSPACE)/raw/labelsTr \
		--labels $(DEMO_WORKSPACE)/raw/dataset.json -o $(DEMO_WORKSPACE)/results/sanity_summary.json

clean:
	rm -rf $(VENV) $(DEMO_WORKSPACE) *.egg-info
