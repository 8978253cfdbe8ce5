# Two commands for a newcomer; each installs what is missing first (a .venv in this folder).
#   make run    generate from the bundled tiny model (trained with MuonClip, shipped in hybrid/models/tiny_k2)
#   make test   the test suite (heavy cases are marked slow; `make test-all` runs them too)
#   make gpu-check   on a GPU machine: CUDA tests, bench-model decode/prefill, logits against the CPU path
#                    (< 8 minutes; no install: the checkout and a CUDA build of torch; skipped without a GPU)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): setup.py constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hybrid generate --prompt "Hello, who are you?" --max-new-tokens 100

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m ""

GPU_PY ?= $(shell test -x $(VENV)/bin/python && echo $(VENV)/bin/python || echo $(PY))
gpu-check:
	PYTHONPATH=. $(GPU_PY) -m bench.gpu_check

.PHONY: install run test test-all gpu-check
