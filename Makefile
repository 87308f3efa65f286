# Two commands for a new user: `make demo` (example end to end, offline, writes a PNG) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: demo test pictures pictures-check bench bench-deps lint clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(RUN) $(BIN)/python examples/quickstart.py

test: $(VENV)/.installed
	$(RUN) $(BIN)/python -m pytest -q
	$(RUN) $(BIN)/python benchmarks/capture.py --smoke --json outputs/bench-smoke.json

# the README's pictures, redrawn from the commands shown beside them (pictures-check: compare only;
# tests/test_cli_pictures.py runs the same check in `make test`)
pictures: $(VENV)/.installed
	$(RUN) $(BIN)/python scripts/readme_pictures.py

pictures-check: $(VENV)/.installed
	$(RUN) $(BIN)/python scripts/readme_pictures.py --check

bench: $(VENV)/.installed bench-deps
	$(RUN) $(BIN)/python benchmarks/capture.py
	$(RUN) $(BIN)/python benchmarks/queries.py
	$(RUN) $(BIN)/python benchmarks/predecessors.py
	$(RUN) $(BIN)/python benchmarks/peers.py
	$(RUN) $(BIN)/python benchmarks/dit.py
	$(RUN) $(BIN)/python benchmarks/families.py

# daam 0.2.0 and attention-map-diffusers 1.0.0 (PyPI) for the side-by-side benchmarks, kept out of
# the package's environment
bench-deps: .bench/daam/daam .bench/amd/attention_map_diffusers

.bench/daam/daam:
	$(BIN)/pip install -q --no-deps --target .bench/daam daam==0.2.0

.bench/amd/attention_map_diffusers:
	$(BIN)/pip install -q --no-deps --target .bench/amd attention-map-diffusers==1.0.0

lint: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/ruff check src tests benchmarks examples scripts
	$(BIN)/ruff format --check src tests benchmarks examples scripts
	$(BIN)/mypy src/daami2i --ignore-missing-imports

clean:
	rm -rf $(VENV) outputs .pytest_cache .bench
