"""caldpo.launch: command line, the submitted callable, and a local run (no Slurm needed)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _slurm as S  # noqa: E402

from caldpo import launch  # noqa: E402


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "caldpo.launch", "--help"], capture_output=True, text=True,
                         cwd=S.REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    for opt in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--partition", "--time", "--mem", "--sbatch",
                "--executor", "--log-dir", "--run-dir", "--wait"):
        assert opt in out.stdout, opt


def test_parse_options_and_overrides():
    a = launch.build_parser().parse_args(
        ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "90", "--mem", "500G",
         "--sbatch", "account=proj", "--sbatch=--qos=high", "--executor", "local", "--wait",
         "--", "model=tiny", "loss=caldpo", "loss.beta=0.1"])
    assert (a.nodes, a.gpus_per_node, a.partition, a.time, a.mem, a.executor, a.wait) == \
        (2, 4, "gpu", 90, "500G", "local", True)
    assert dict(a.sbatch) == {"account": "proj", "qos": "high"}
    assert a.overrides == ["model=tiny", "loss=caldpo", "loss.beta=0.1"]
    with pytest.raises(SystemExit):
        launch.build_parser().parse_args(["--sbatch", "novalue"])
    with pytest.raises(SystemExit):
        launch.build_parser().parse_args(["--executor", "kubernetes"])


def test_submit_rejects_unknown_executor(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        launch.submit(["model=tiny"], executor="cloud", log_dir=tmp_path)


def sbatch_text(**options) -> tuple[str, launch.Train]:
    """The sbatch file submitit would write for these options, and the callable."""
    ex, fn = launch.prepare(**options)
    return ex._executor._make_submission_file_text("python -u -m submitit.core._submit", "%j"), fn


def test_slurm_submission_script(tmp_path):
    """Tasks per GPU, requeue, extra parameters, the checkpoint signal."""
    text, fn = sbatch_text(overrides=["model=tiny", "run_dir=/x/y"], nodes=2, gpus_per_node=4, cpus_per_task=8,
                           partition="gpu", time_min=90, mem="500G", sbatch={"account": "proj"}, log_dir=tmp_path)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
                 "--partition=gpu", "--time=90", "--mem=500G", "--account=proj", "--requeue",
                 "--open-mode=append", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in text, (line, text)
    assert isinstance(fn, launch.Train) and fn.run_dir == "/x/y"
    assert not any(o.startswith("device=") for o in fn.overrides)
    # a CPU run asks for no GPU and trains on the CPU
    text, fn = sbatch_text(overrides=["model=tiny"], gpus_per_node=0, tasks_per_node=2, log_dir=tmp_path,
                           run_dir=tmp_path / "r")
    assert "gpus-per-node" not in text and "#SBATCH --ntasks-per-node=2" in text
    assert "device=cpu" in fn.overrides and fn.run_dir == str(tmp_path / "r")


def test_checkpoint_stops_the_trainer_then_requeues(tmp_path):
    """checkpoint() writes STOP, waits for the trainer to finish, removes STOP, and resubmits itself."""
    train = pickle.loads(pickle.dumps(launch.Train(["model=tiny"], str(tmp_path / "run"), stop_wait_s=30)))
    seen = {}

    def trainer():  # what the real trainer does: notice STOP at a step boundary, checkpoint, return
        while not (tmp_path / "run" / "STOP").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        seen["stop_seen"] = True
        train._done.set()

    threading.Thread(target=trainer, daemon=True).start()
    t0 = time.time()
    again = train.checkpoint()
    assert seen.get("stop_seen") and 0.4 < time.time() - t0 < 20
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, launch.Train) and again.function.run_dir == train.run_dir
    assert again.function.overrides == ["model=tiny"]
    assert not (tmp_path / "run" / "STOP").exists()
    pickle.dumps(again)  # submitit pickles it for the requeued job


def test_local_executor_trains(tmp_path):
    """`python -m caldpo.launch --executor local --wait`: a tiny run to DONE without Slurm."""
    tldr = S.write_tldr_sample(tmp_path / "tldr.jsonl")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(
        [sys.executable, "-m", "caldpo.launch", "--executor", "local", "--wait", "--log-dir", str(tmp_path / "logs"),
         "--run-dir", str(run_dir), "--", *S.TINY_TLDR, "trainer=BasicTrainer", "loss=caldpo", "loss.beta=0.1",
         "datasets=[tldr]", f"data.paths.tldr={tldr}", "n_examples=16"],
        capture_output=True, text=True, cwd=S.REPO, env=env, timeout=600)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*_log.*"))
    assert out.returncode == 0, out.stdout + out.stderr + logs[-5000:]
    assert (run_dir / "DONE").exists() and (run_dir / "LATEST" / "policy.pt").exists()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line and '"train"' in line]
    assert steps == [1, 2, 3, 4]
    assert "'step': 4" in out.stdout


REASON = S.cluster_reason()
cluster = pytest.mark.skipif(REASON is not None, reason=f"no Slurm cluster: {REASON}")


def _launch_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "caldpo.launch", "--log-dir", str(tmp_path / "logs"), *args],
                          capture_output=True, text=True, cwd=S.REPO, env=env, timeout=300)


@cluster
def test_launch_checks_before_queueing(tmp_path):
    """`caldpo.launch` (CLI and python API) refuses a misspelt override and GPUs that the partition lacks with one
    `caldpo:` line and exit 2, before submitit writes or queues anything; --check-only runs the checks alone."""
    from caldpo.launch import SubmitError, partitions
    from caldpo.train.config import ConfigError

    name = f"launchcheck_{os.getpid()}"
    ok = _launch_cli(["--check-only", "--gpus-per-node", "0", "--tasks-per-node", "2", "--", "model=tiny",
                      "trainer=FSDPTrainer", "batch_size=4"], tmp_path)
    assert ok.returncode == 0 and "caldpo: submission checks passed:" in ok.stdout, ok.stderr
    assert "device=cpu, world size 2" in ok.stdout, ok.stdout
    typo = _launch_cli(["--gpus-per-node", "0", "--job-name", name, "--", "model=tiny", "batchsize=4"], tmp_path)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "caldpo: config error: batchsize: unknown option; did you mean batch_size? "
        "(python -m caldpo.train --help lists every option)"], typo.stderr
    odd = _launch_cli(["--check-only", "--gpus-per-node", "0", "--tasks-per-node", "3", "--", "model=tiny",
                       "trainer=FSDPTrainer", "batch_size=4"], tmp_path)
    assert odd.returncode == 2 and "batch_size=4 is not divisible" in odd.stderr and "(3)" in odd.stderr, odd.stderr
    with pytest.raises(ConfigError, match="batchsize"):
        launch.submit(["model=tiny", "batchsize=4"], gpus_per_node=0, job_name=name, log_dir=tmp_path / "logs")
    found = partitions()
    if found is not None and found[0].get(found[1], 0) < 8:
        gpus = _launch_cli(["--job-name", name, "--", "model=tiny"], tmp_path)
        assert gpus.returncode == 2 and "has no GPUs" in gpus.stderr and "--gpus-per-node 0" in gpus.stderr, gpus.stderr
        with pytest.raises(SubmitError, match="pending forever"):
            launch.submit(["model=tiny"], gpus_per_node=8, job_name=name, log_dir=tmp_path / "logs")
    assert S.jobs_named(name) == [] and not (tmp_path / "logs").exists()
