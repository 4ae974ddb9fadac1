# otlab — build, test and docs entry points.
#
# Every target creates .venv (with $(PYTHON) -m venv) if it is missing and runs
# `pip install -e .[dev,bench]` only when pyproject.toml has changed since the last
# install: the install leaves a stamp .venv/.installed-<sha256 of pyproject.toml>.
# (--no-compile: Python compiles only the modules that are imported, when first
# imported; byte-compiling every installed package took ~17 s of a fresh install.)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HASH   := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:16])")
STAMP  := $(VENV)/.installed-$(HASH)

export JAX_PLATFORMS := cpu
export MPLBACKEND := Agg
export NO_MKDOCS_2_WARNING := 1

.DEFAULT_GOAL := help
.PHONY: help install demo test unit notebooks bench docs lint clean distclean

help:
	@echo "make demo   - run the otlab demo (python -m otlab demo)"
	@echo "make test   - unit tests, notebooks, strict docs build"
	@echo "make bench  - benchmarks against ott-jax and POT (python -m benchmarks.run)"
	@echo "make docs   - build the documentation site into site/ (mkdocs --strict)"
	@echo "make lint   - ruff check"
	@echo "make clean  - remove build outputs and caches (distclean also removes .venv)"
	@echo "make lab    - install JupyterLab into .venv (once) and open the notebooks"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): | $(PY)
	@test -f otlab/__init__.py || { echo "error: otlab/__init__.py not found; nothing to install" >&2; exit 1; }
	$(PY) -m pip install --no-compile -e '.[dev,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m otlab demo

# One pytest session for the unit tests and the notebooks (notebooks first: they are
# the longest items, so the two workers finish together), then the strict docs build.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup --durations=25 --nbmake notebooks tests
	$(MAKE) docs

unit: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests

notebooks: $(STAMP)
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		echo "$(PY) -m pytest -n 2 --nbmake notebooks"; \
		$(PY) -m pytest -n 2 --nbmake notebooks; \
	else \
		echo "no notebooks/*.ipynb: skipping notebook tests"; \
	fi

bench: $(STAMP)
	$(PY) -m benchmarks.run

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d site

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf site out build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)

# JupyterLab is not a project dependency: installed into .venv on first use. The
# kernel is .venv's python (ipykernel is a dev dependency); MPLBACKEND=Agg (exported
# above for the scripted targets) is dropped so that plots show inline.
.PHONY: lab
lab: $(STAMP)
	@$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install 'jupyterlab>=4,<5'
	env -u MPLBACKEND $(VENV)/bin/jupyter lab notebooks
