"""FSDP2 under torchrun on CPU (gloo): equivalence with one process, crash-safe resume, reference cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, read_metrics, run_train

COMMON = [*TINY, "trainer=FSDPTrainer", "lr=1e-3", "optimizer=AdamW",
          "do_first_eval=false", "eval_every=100000", "export_hf=false"]


def _final_state(run_dir):
    return torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]


def test_two_processes_match_one(sft_run, tmp_path):
    """Same global batch: 2 ranks x 1 micro-batch == 1 rank x 2 accumulated micro-batches."""
    # SGD, so that the weight change is the summed gradient (Adam would amplify float noise in
    # near-zero gradients, such as the key bias, into lr-sized steps).
    args = [*COMMON, "loss=caldpo", f"model.archive={sft_run}/LATEST/policy.pt", "n_examples=24", "batch_size=8",
            "optimizer=SGD", "lr=1e-2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_train([*args, f"run_dir={one}", "gradient_accumulation_steps=2"], torchrun=1)
    run_train([*args, f"run_dir={two}", "gradient_accumulation_steps=1"], torchrun=2)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    s0 = torch.load(sft_run / "LATEST" / "policy.pt", weights_only=True)["state"]
    s1, s2 = _final_state(one), _final_state(two)
    moved = 0
    for k in s0:
        d1, d2 = s1[k] - s0[k], s2[k] - s0[k]
        if d1.norm() > 0:
            moved += 1
            assert (d1 - d2).norm() <= 1e-3 * d1.norm() + 1e-7, k
    assert moved > len(s0) // 2


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and all its workers at once, as a node failure would."""
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmd(args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "caldpo.train", *args]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    args = [*COMMON, "loss=sft", "n_examples=80", "batch_size=8", "save_every=2", "keep_checkpoints=10"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_train([*args, f"run_dir={ref_dir}"], torchrun=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd([*args, f"run_dir={run_dir}"]), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints" / "step_4").exists() and len(read_metrics(run_dir)) >= 5:
            _kill_tree(proc.pid)
            killed_at = len(read_metrics(run_dir))
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None and killed_at < 10, "the run ended before it could be killed"
    time.sleep(2)
    assert len(read_metrics(run_dir)) == killed_at, "a worker outlived the kill"
    assert not (run_dir / "DONE").exists()
    run_train([*args, f"run_dir={run_dir}"], torchrun=2)
    resumed = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
               if "resumed_from_step" in l]
    assert resumed and resumed[-1]["resumed_from_step"] >= 4
    a, b = read_metrics(ref_dir), read_metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
    s1, s2 = _final_state(ref_dir), _final_state(run_dir)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-6, msg=k)


def test_stop_file_checkpoints_and_exits(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    stopped = run_train([*COMMON, "loss=sft", "n_examples=64", "batch_size=8", f"run_dir={run_dir}"], check=False)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert not (run_dir / "DONE").exists() and not (run_dir / "STOP").exists()
    assert (run_dir / "checkpoints" / "step_1").is_dir()
    run_train([*COMMON, "loss=sft", "n_examples=64", "batch_size=8", f"run_dir={run_dir}"])
    assert (run_dir / "DONE").exists()
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))


def test_reference_cache_matches_reference_model(sft_run, tmp_path):
    args = [*COMMON, "loss=caldpo", f"model.archive={sft_run}/LATEST/policy.pt", "n_examples=16", "batch_size=8",
            f"reference.cache_dir={tmp_path / 'cache'}", "trainer=BasicTrainer"]
    run_train([*args, f"run_dir={tmp_path / 'model'}", "reference.mode=model"])
    run_train([*args, f"run_dir={tmp_path / 'cache1'}", "reference.mode=cache"])
    files = list((tmp_path / "cache").glob("ref_logps_*.pt"))
    assert len(files) == 1
    m, c = read_metrics(tmp_path / "model"), read_metrics(tmp_path / "cache1")
    for x, y in zip(m, c):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    proc = run_train([*args, f"run_dir={tmp_path / 'cache2'}", "reference.mode=cache"])
    assert "from cache" in proc.stderr + proc.stdout
    run_train([*args, f"run_dir={tmp_path / 'cache3'}", "reference.mode=cache", "max_length=80"])
    assert len(list((tmp_path / "cache").glob("ref_logps_*.pt"))) == 2, "changed truncation must not reuse the cache"
