# Two commands on a fresh machine:  `make demo` (set up, segment the bundled example; without weights, a synthetic demo)
# and `make test` (set up, run the tests). Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The real CUDA toolkit root (bin/nvcc and lib64/libcudart): the nvcc on PATH may be a wrapper.
CUDA_HOME ?= $(firstword $(foreach d,/usr/local/cuda-13.0 /usr/local/cuda $(wildcard /usr/local/cuda-*),$(if $(wildcard $(d)/bin/nvcc),$(if $(wildcard $(d)/lib64/libcudart.so*),$(d)))))
export CUDA_HOME
MAX_JOBS ?= 2
export MAX_JOBS
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test sanitize bench gpu-check fuzz clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,crf]"
	$(PY) -c "import insid3_fast.ops as o; print('native ops:', o.native_available(), o.load_error() or '')"
	touch $@

demo: setup
	$(PY) -m insid3_fast.demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The emulated CUDA suite (csrc/cuda on the CPU, OS-thread mode) under ThreadSanitizer, then
# AddressSanitizer: any report fails the run (tests/cuda_emu/sanitize.py).
sanitize: setup
	$(PY) tests/cuda_emu/sanitize.py

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only

gpu-check:
	bash benchmarks/gpu_check.sh

# The full fuzz run of the native ops (10,000 inputs per op and API; tests/fuzz_ops.py).
fuzz: setup
	$(PY) tests/fuzz_ops.py

clean:
	rm -rf $(VENV) build *.egg-info insid3_fast/*.so
