"""A fresh install: test modules that cannot hide installed packages, and models loaded without hub kernels."""
from __future__ import annotations

import importlib.metadata
import os
import re
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


def _make_dry_run(target: str, tmp_path: Path) -> list[str]:
    """The commands ``make <target>`` would run into a fresh venv (make -n prints, runs nothing)."""
    # Under a parent make (CI runs the suite through `make test`) MAKELEVEL/MAKEFLAGS would add "Entering/Leaving
    # directory" lines and the parent's flags: the dry run is a top-level make of its own.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={tmp_path / 'venv'}"],
                         capture_output=True, text=True, cwd=TESTS.parent, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_make_demo_installs_only_what_it_runs_and_make_test_the_test_extras(tmp_path):
    """`make demo` installs caldpo with the native head's ninja, not the test extras (Triton alone is ~1 GB);
    `make test` and CI (.ci/run) install the test extras before the suite."""
    import shutil
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    demo = _make_dry_run("demo", tmp_path)
    installs = [c for c in demo if " pip install" in c]
    assert any('-e ".[native]"' in c for c in installs), demo
    extras = [e for c in installs for e in re.findall(r'-e "\.\[([a-z,]*)\]"', c)]
    assert extras and not any("test" in e.split(",") for e in extras), demo
    assert demo[-1].endswith("-m caldpo.train.demo")
    test = _make_dry_run("test", tmp_path)
    at = next(i for i, c in enumerate(test) if re.search(r'-e "\.\[[a-z,]*\btest\b[a-z,]*\]"', c))
    assert "-m pytest -q tests;" in test[-1] and at < len(test) - 1, test
    ci = (TESTS.parent / ".ci" / "run").read_text()
    assert "make install-test" in ci and "make test" in ci


# Packages that only the test extras bring: the demo must run with every one of them missing.
_TEST_ONLY = ("pytest", "_pytest", "triton", "tensorboard", "openai", "ruff")
_DEMO = """
import sys
BLOCKED = set(sys.argv[2].split(","))
class Hide:  # every finder answers as if the test extras were not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import importlib.util
assert all(importlib.util.find_spec(m) is None for m in BLOCKED)  # hidden, installed or not
from caldpo.train import demo
demo.SFT = ["loss=sft", "lr=1e-3", "n_examples=16"]
demo.CALDPO = ["loss=caldpo", "loss.beta=0.1", "lr=2e-4", "n_examples=16"]
demo.GENERATE = ["generate.n_prompts=2", "max_new_tokens=4"]
demo.COMMON = [*demo.COMMON, "n_eval_examples=32", "export_at_eval=false"]
out = demo.main(["--root", sys.argv[1]])
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("DEMO-OK", out["plot"])
"""


def test_the_demo_runs_without_the_test_extras(tmp_path):
    """Every stage of `make demo` (SFT, Cal-DPO, generation, the local-LM judge, the plot), shortened, with the
    test extras made unimportable: what `make install` installs is what the demo needs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _DEMO, str(tmp_path / "demo"), ",".join(_TEST_ONLY)],
                         capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=900)
    assert out.returncode == 0 and "DEMO-OK" in out.stdout, (out.stdout[-3000:], out.stderr[-5000:])
    assert Path(out.stdout.split("DEMO-OK", 1)[1].split()[0]).is_file()


_BUILD = """
import sys
from caldpo.kernels import native
print("AVAILABLE", native.available(), native.unavailable_reason())
"""


def test_first_native_build_says_what_it_does_once(tmp_path):
    """A build into an empty CALDPO_CACHE prints one line on stderr naming where it goes (the build takes
    about half a minute of CPU); the next process finds the cached build and prints nothing."""
    from caldpo.kernels import native
    reason = native._missing_tools()
    if reason is not None:
        pytest.skip(f"the native head cannot be built here: {reason}")
    env = {**os.environ, "CALDPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("CALDPO_NATIVE_DISABLE", None)
    runs = [subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0 and "AVAILABLE True None" in r.stdout, (r.stdout, r.stderr[-3000:])
    lines = [line for line in runs[0].stderr.splitlines() if "building the native CPU head" in line]
    assert len(lines) == 1, runs[0].stderr
    assert lines[0].startswith("caldpo: building the native CPU head (first use") and str(tmp_path / "cache") in lines[0]
    assert "building" not in runs[1].stderr, runs[1].stderr


def test_a_folder_named_caldpo_in_the_working_directory_does_not_break_a_run(tmp_path):
    """From the folder a clone sits in (``./caldpo`` without an ``__init__.py`` there makes ``caldpo`` a
    namespace package, so ``caldpo/__init__.py`` never runs): a run trains, its token cache built in a
    child process, without needing anything ``caldpo/__init__.py`` defines."""
    (tmp_path / "caldpo").mkdir()
    (tmp_path / "caldpo" / "README.md").write_text("a clone\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "caldpo.train", "n_examples=8", "batch_size=4", "eval_every=8",
                          f"run_dir={tmp_path / 'run'}", f"data.token_cache_dir={tmp_path / 'tokens'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and list((tmp_path / "tokens").glob("*.tokens"))
