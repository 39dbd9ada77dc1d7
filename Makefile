# Two commands set everything up on a fresh machine:
#   make run   - install into .venv and start the app (SQLite + data under SAE_LAB_HOME, default ./lab_data)
#   make test  - install into .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501

.PHONY: run test install lint typecheck bench clean saelens-check quality-bench

# The project installs editable with its pinned dependencies and test tools (pyproject.toml).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Streamlit's server believes X-Forwarded-For only from the proxies SAE Lab trusts (none unless set).
run: install
	FORWARDED_ALLOW_IPS="$${FORWARDED_ALLOW_IPS-$${SAE_LAB_TRUSTED_PROXIES-}}" \
		$(PY) -m streamlit run app.py --server.port $(PORT) --server.headless true

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache

# SAELens in a side environment (heavy deps), beside the project itself (its tests import sae_core). torch
# stays pinned in the same pip command: an unpinned one would pull a CUDA build of several GB.
SAELENS_VENV := .venv-saelens
$(SAELENS_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv --system-site-packages $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/pip install -q -e '.[dev]' torch==2.13.0 sae-lens==6.54.12
	touch $@

# SAELens compatibility: loads our saved SAEs with sae_lens.
saelens-check: $(SAELENS_VENV)/.installed
	$(SAELENS_VENV)/bin/python -m pytest -q tests/engine/test_sae_lens_compat.py tests/engine/test_sae.py

# SAE quality against SAELens at equal tokens and equal wall time (QUALITY_ARGS=--quick for a few rows).
quality-bench: $(SAELENS_VENV)/.installed
	$(PY) -m bench.quality_vs_saelens $(QUALITY_ARGS)
