# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test cluster lint bench bench-http bench-realtime bench-failover clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/hachat serve

cluster: $(BIN)/.installed
	$(BIN)/hachat cluster

test: $(BIN)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: bench-http bench-realtime bench-failover

bench-http: $(BIN)/.bench-installed
	$(BIN)/python -m bench.http_bench $(BENCH_ARGS)

bench-realtime: $(BIN)/.bench-installed
	$(BIN)/python -m bench.realtime_bench $(BENCH_ARGS)

bench-failover: $(BIN)/.bench-installed
	$(BIN)/python -m bench.failover_bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
