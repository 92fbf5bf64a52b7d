# Two commands on a fresh machine: `make demo` and `make test`. Both install into a virtual
# environment in .venv (created from python3 >= 3.10) and need nothing done by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is pinned first to 2.13.0: on this project's machines pip finds that CPU build on disk
# (a plain `torch` would pull a multi-GB CUDA build); on any other machine it comes from PyPI.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/instbank build --coco data/sample/coco/annotations.json --out $(OUT)/demo-bank --size 128 --overwrite
	$(VENV)/bin/instbank stats $(OUT)/demo-bank
	$(VENV)/bin/instbank preview $(OUT)/demo-bank --out $(OUT)/preview.png
	$(VENV)/bin/instbank paste-demo $(OUT)/demo-bank --coco data/sample/coco/annotations.json --out $(OUT)/paste-demo.png

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(OUT) $(VENV) src/*.egg-info
