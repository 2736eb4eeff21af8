# The two set-up commands: `make demo` and `make test`. Both build the venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_WORKSPACE ?= demo_workspace
# A few minutes of CPU training: enough to see the pipeline work end to end, not to converge.
DEMO_EPOCHS ?= 8
DEMO_ITERATIONS ?= 25
# Each round's student fine-tunes the newest model (the default) for this many epochs, and final/ keeps the best
# on validation.
DEMO_STUDENT_EPOCHS ?= 4

.PHONY: venv test demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test,openvino]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	rm -rf $(DEMO_WORKSPACE)
	$(BIN)/covnet_make_phantoms --workspace $(DEMO_WORKSPACE) --num-labelled 10 --num-unlabelled 4 --num-test 2 --seed 0
	$(BIN)/covnet_plan_and_preprocess --workspace $(DEMO_WORKSPACE) -np 2 --device cpu
	$(BIN)/covnet_train 0 --workspace $(DEMO_WORKSPACE) --epochs $(DEMO_EPOCHS) --iters-per-epoch $(DEMO_ITERATIONS) \
		--val-iters 5 --checkpoint-every 5 --no-val-mirroring
	$(BIN)/covnet_selftrain --workspace $(DEMO_WORKSPACE) --max-rounds 2 \
		--epochs $(DEMO_STUDENT_EPOCHS) --val-iters 5 --no-teacher-mirroring --no-val-mirroring
	$(BIN)/covnet_predict --workspace $(DEMO_WORKSPACE) -i $(DEMO_WORKSPACE)/raw/imagesTs -o $(DEMO_WORKSPACE)/predictions
	$(BIN)/covnet_evaluate --ref $(DEMO_WORKSPACE)/raw/labelsTs --pred $(DEMO_WORKSPACE)/predictions \
		--labels $(DEMO_WORKSPACE)/raw/dataset.json -o $(DEMO_WORKSPACE)/results/test_summary.json
	cat $(DEMO_WORKSPACE)/predictions/report.csv

clean:
	rm -rf $(VENV) $(DEMO_WORKSPACE) *.egg-info
