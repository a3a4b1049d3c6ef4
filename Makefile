# Every target creates .venv on first use, so a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU ranks for the demo and the tests when no GPU is present; ignored by DeepSpeed on GPU nodes.
export DS_ACCELERATOR ?= $(shell $(PY) -c "import shutil,sys; sys.stdout.write('cpu' if shutil.which('nvidia-smi') is None else 'cuda')")

.PHONY: venv demo test bench lint format clean

venv: $(VENV)/.installed

# torch first (exact pin: a CPU wheel where one is provided locally), deepspeed without build
# isolation (its build imports torch), then dsforget itself in editable mode with its extras.
$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Full fine-tuning, MoFO and HFT on the lab, compared at matched task gain along training
# (README "What make demo shows"); all local GPUs per run, or 2 CPU ranks (gloo) without one.
demo: venv
	$(BIN)/python launch/compare.py --methods full,mofo,hft --output_dir runs/demo -- --max_steps 150 --no-export

# SLURM and munge for the cluster tests where apt-get and root allow (a no-op with a message elsewhere)
test: venv
	bash tests/install_slurm.sh
	$(BIN)/python -m pytest -q --durations=25 tests

bench: venv
	$(BIN)/python -m dsforget.kernels.bench

lint: venv
	$(BIN)/ruff check dsforget kernels launch tests
	$(BIN)/ruff format --check dsforget kernels launch tests

format: venv
	$(BIN)/ruff format dsforget kernels launch tests

clean:
	rm -rf $(VENV) build *.egg-info
