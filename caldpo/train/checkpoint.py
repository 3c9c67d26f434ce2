"""Checkpoints: sharded resume checkpoints (DCP) and the reference-format final export.

Resume checkpoints live in ``<run_dir>/checkpoints/step_<N>``. Every rank writes its
shards into ``tmp_step_<N>`` and rank 0 renames it once all ranks are done, so a crash
(even SIGKILL) during a save leaves the previous checkpoint intact and the partial one
invisible. The final export is ``<run_dir>/LATEST/policy.pt`` holding
``{"step_idx", "state", "metrics"}`` (the reference code's format) plus, optionally,
a Hugging Face ``save_pretrained`` directory in ``LATEST/hf``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_resume(root: Path) -> Path | None:
    """The newest complete resume checkpoint under ``root``, or None."""
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def save_resume(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int = 2) -> Path:
    """Save model, optimizer, scheduler, data position and RNG of every rank; atomic per checkpoint."""
    rank = _rank()
    final, tmp = root / f"step_{step}", root / f"tmp_step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns when it runs without a process group, which is intended here
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        state = dict(trainer_state, step=step, scheduler=scheduler.state_dict())
        torch.save(state, tmp / "trainer_state.pt")
    _barrier()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
        for _, old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("tmp_step_*"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_resume(path: Path, model, optimizer, scheduler) -> dict:
    """Restore what save_resume wrote; returns the trainer state (step, examples seen, ...)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def full_state_dict(module) -> dict[str, torch.Tensor]:
    """Unsharded, CPU state dict gathered on every rank (only rank 0 keeps values under FSDP2)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)


def save_policy(run_dir: Path, lm, step: int, metrics: dict, tokenizer=None, export_hf: bool = True) -> Path | None:
    """Write ``LATEST/policy.pt`` (and the HF export) from rank 0; every rank must call it."""
    state = full_state_dict(lm)
    if _rank() != 0:
        _barrier()
        return None
    latest = run_dir / "LATEST"
    latest.mkdir(parents=True, exist_ok=True)
    tmp = latest / "policy.pt.tmp"
    torch.save({"step_idx": step, "state": state, "metrics": metrics}, tmp)
    os.replace(tmp, latest / "policy.pt")
    if export_hf:
        hf_dir = latest / "hf"
        lm.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(hf_dir)
    with open(latest / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    _barrier()
    return latest / "policy.pt"
