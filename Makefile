# Two entry points a newcomer needs: `make demo` (set up + run the embedded demo) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FULL := $(VENV)/.installed-extras

# llama-cpp-python compiles llama.cpp (about 6 min on 2 cores; pip caches the wheel). A portable AVX2 build:
# a native build turns on AMX where the CPU advertises it, and AMX crashes in VMs that do not enable it.
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

.PHONY: install demo test tools clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel pinned first so no dependency pulls a multi-GB CUDA build of torch
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# the extras the tests exercise: Ray (jobs backend), GGUF export (builds llama.cpp), QLoRA (bitsandbytes), the web
# console (FastAPI)
$(FULL): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -e '.[dev,ray,gguf,qlora,ui]'
	touch $(FULL)

install: $(FULL)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/tunery demo

# Go runs the Ollama template parity tests (a real text/template renderer); Chromium runs the browser tests
# (tests/browser, through Playwright: its own browser download is not needed)
tools:
	@command -v go >/dev/null || (apt-get update -qq && apt-get install -y -qq golang-go >/dev/null)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(FULL) tools
	$(BIN)/ruff check tunery tests bench
	# two workers, a test file each at a time (its module fixtures stay in one process), files with the most tests first;
	# one torch thread a process: two workers and the CLIs they start already fill 2 cores (30% faster than torch's own
	# thread count, which oversubscribes them)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not gpu" -n 2 --dist loadfile   # gpu tests: pytest -m gpu

clean:
	rm -rf $(VENV) tunery-demo runs
