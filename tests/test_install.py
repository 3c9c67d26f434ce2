"""A fresh install: test modules that cannot hide installed packages, and models loaded without hub kernels."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _names_on_pytest_path() -> set[str]:
    """Top-level names pytest's default import mode puts on sys.path from tests/: its modules and packages."""
    names = {p.stem for p in TESTS.glob("*.py")}
    names |= {p.name for p in TESTS.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def test_no_test_module_shadows_an_installed_distribution():
    """tests/ is on sys.path during a run: a test package named like an installed top-level module (as
    ``tests/kernels`` hid the ``kernels`` package transformers imports) breaks every model import."""
    installed = set(importlib.metadata.packages_distributions())
    clashes = sorted(_names_on_pytest_path() & installed)
    assert not clashes, f"tests/ names that hide installed modules: {clashes}; rename them"


def test_the_guard_sees_installed_modules():
    """The check above can fail: it knows the top-level modules of what is installed."""
    installed = set(importlib.metadata.packages_distributions())
    assert {"torch", "transformers", "pytest"} <= installed


_PROBE = """
import os, sys
os.environ["USE_HUB_KERNELS"] = "YES"
from transformers import AutoModelForCausalLM
from caldpo.hf import from_pretrained
from caldpo.train.config import load_config
from caldpo.train.model import load_causal_lm, model_path
import torch
path = sys.argv[1]
plain = AutoModelForCausalLM.from_pretrained(path)
ours = from_pretrained(AutoModelForCausalLM, path)
cfg = load_config(["model=tiny"])
trained = load_causal_lm(cfg, model_path(cfg), torch.float32, "sdpa")
print(plain.use_kernels, ours.use_kernels, trained.use_kernels, os.environ["USE_HUB_KERNELS"])
"""


def test_models_load_without_hub_kernels(tmp_path):
    """With USE_HUB_KERNELS=YES set by the user, transformers' own loader kernelizes the model (so the check
    can fail) while every caldpo load keeps the model's own layers and turns the variable off."""
    from caldpo.hf import hub_kernels_supported
    from caldpo.train.tiny import tiny_model_dir
    if not hub_kernels_supported():
        pytest.skip("this transformers has no hub kernels (set_use_kernels): nothing to switch off")
    env = {**os.environ, "USE_HUB_KERNELS": "YES", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tiny_model_dir())], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["True", "False", "False", "NO"], out.stdout
