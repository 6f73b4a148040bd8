# The two commands a newcomer types: `make run` and `make test`.
# Both create .venv and install the project into it the first time, and are quick after that.
PYTHON ?= python3
VENV := .venv
# Pinned on purpose: on the reference machine torch==2.13.0 is a CPU build on local disk, while a
# plain `torch` would pull a multi-GB CUDA build. Any torch>=2.4 works: override with
# `make run TORCH_SPEC="torch==2.6.0"` or install into your own environment (see README).
TORCH_SPEC ?= torch==2.13.0
EXPERIMENT ?= experiments/digits_mlp.toml
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/slimsearch run $(EXPERIMENT)

# pytest exits 5 when it collects no tests: nothing failed, so that is not an error here.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) runs .pytest_cache
