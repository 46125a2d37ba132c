# Every target sets itself up on a fresh machine: .venv is created when missing, torch is
# installed first (torch==2.13.0 resolves to the CPU wheel on local disk, never a CUDA build),
# then the package with its extras.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TORCH   := torch==2.13.0

.PHONY: test lint format demo docs notebooks bench wheel clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,docs,examples]" $(TORCH)
	rm -f .venv/.installed-* && touch $@

lint: $(STAMP)
	$(PY) -m ruff check pyro_ntk tests examples benchmarks docs
	$(PY) -m ruff format --check pyro_ntk tests examples benchmarks docs
	.venv/bin/lint-imports --no-cache .importlinter

format: $(STAMP)
	$(PY) -m ruff format pyro_ntk tests examples benchmarks docs
	$(PY) -m ruff check --fix pyro_ntk tests examples benchmarks docs

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m pyro_ntk demo

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

notebooks: $(STAMP)  # re-execute docs/tutorials/*.ipynb in full mode, storing their outputs
	$(PY) tests/test_notebooks.py

wheel: $(STAMP)  # dist/: the wheel and the sdist (what `pip install pyro-ntk` gets)
	$(PY) -m pip install -q build
	$(PY) -m build --outdir dist .

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf .venv docs/_build .pytest_cache .ruff_cache dist build
