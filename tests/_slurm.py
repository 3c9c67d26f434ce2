"""Helpers for the tests that submit real jobs to a Slurm cluster (.ci/slurm_up.sh)."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Tiny CPU run: 2 ranks of FSDP2 (gloo), 4 optimizer steps of 4 examples.
TINY_TLDR = ["model=tiny", "device=cpu", "trainer=FSDPTrainer", "model.archive=null",
             "model.fsdp_policy_mp=null", "batch_size=4", "gradient_accumulation_steps=1",
             "eval_batch_size=4", "n_eval_examples=4", "max_length=64", "max_prompt_length=32",
             "warmup_steps=0", "lr=1e-4", "eval_every=100000", "export_hf=false"]
# sbatch options that fit the scripts' GPU defaults onto a CPU-only test node (slurm/README.md, "CPU nodes";
# with slurm/submit.sh, CALDPO_CPU=1 asks for no GPUs by itself).
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=2", "--mem=6G", "--time=10"]


def cluster_reason() -> str | None:
    """None when a Slurm cluster answers and has a usable node, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client tools (sinfo, sbatch) are not installed: run .ci/slurm_up.sh"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering (start it with .ci/slurm_up.sh)"
    states = out.stdout.split()
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()[:200]}): start the cluster with .ci/slurm_up.sh"
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no usable Slurm node (states: {states}): run .ci/slurm_up.sh"
    return None


def write_tldr_sample(path: Path, n_train: int = 32, n_valid: int = 8) -> Path:
    """Raw OpenAI TL;DR comparison rows (split train / valid1) with made-up text."""
    topics = ["garden", "bicycle", "landlord", "chess club", "sourdough", "night shift", "old laptop", "hiking trip"]
    rows = []
    for i in range(n_train + n_valid):
        topic = topics[i % len(topics)]
        post = (f"I have been dealing with my {topic} for {i + 2} weeks now. Every time I think it is sorted, "
                f"something new comes up and I end up spending the whole weekend on it. Any advice?")
        good = f"my {topic} keeps taking my weekends, looking for advice number {i}"
        bad = f"{topic} {topic} stuff happened"
        choice = i % 2
        summaries = [{"text": " " + (good if choice == 0 else bad), "policy": "ref", "note": None},
                     {"text": " " + (bad if choice == 0 else good), "policy": "sup", "note": None}]
        rows.append({"info": {"id": f"t3_{i:05d}", "post": post, "title": f"Question about my {topic}",
                              "subreddit": "AskReddit" if i % 3 else "r/advice", "site": None, "article": None},
                     "summaries": summaries, "choice": choice,
                     "split": "train" if i < n_train else "valid1", "worker": f"w{i % 4}", "batch": "batch1",
                     "extra": {"confidence": 1 + i % 9}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sbatch(script: str, overrides: list[str], *, sbatch_opts: list[str] = (), env: dict | None = None,
           cwd: Path = REPO) -> int:
    """Submit ``slurm/<script>`` with sbatch; returns the job id."""
    # The job runs this interpreter (the scripts' PYTHON), not whatever python3 the PATH finds.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHON": sys.executable, **(env or {})}
    cmd = ["sbatch", "--parsable", *sbatch_opts, str(REPO / "slurm" / script), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} failed: {out.stderr}"
    return int(out.stdout.strip().split(";")[0])


def submit_sh(script: str, overrides: list[str], *, sbatch_opts: list[str] = (), env: dict | None = None,
              cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``slurm/submit.sh [sbatch_opts] slurm/<script> [overrides]`` (the checks, then sbatch)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHON": sys.executable, **(env or {})}
    for k in ("SFT_ARCHIVE", "CALDPO_CPU", "RUN_DIR"):
        if env is None or k not in env:
            full_env.pop(k, None)
    cmd = ["bash", str(REPO / "slurm" / "submit.sh"), *sbatch_opts, str(REPO / "slurm" / script), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


def jobs_named(name: str) -> list[str]:
    """Ids of the jobs slurmctld knows by this name, queued, running or recently ended (scontrol keeps ended
    jobs for MinJobAge; this cluster has no accounting for sacct)."""
    out = subprocess.run(["scontrol", "-o", "show", "jobs"], capture_output=True, text=True, timeout=30)
    ids = []
    for line in out.stdout.splitlines():
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if fields.get("JobName") == name:
            ids.append(fields.get("JobId", "?"))
    queued = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return ids + [i for i in queued.stdout.split() if i not in ids]


def job_info(job_id: int) -> dict[str, str]:
    """``scontrol show job`` as a dict (empty once the job has left slurmctld)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30)
    info = {}
    for word in out.stdout.split():
        if "=" in word:
            k, v = word.split("=", 1)
            info.setdefault(k, v)
    return info


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def _begin_passed(stamp: str) -> bool:
    """Whether scontrol's StartTime (a pending job's begin time, local time) is past."""
    try:
        return datetime.datetime.now() >= datetime.datetime.fromisoformat(stamp) + datetime.timedelta(seconds=1)
    except ValueError:
        return False


def wait_job(job_id: int, timeout: float = 300, poll=None) -> dict[str, str]:
    """Poll until the job reaches a final state; returns its last scontrol record.

    A requeued job waits out Slurm's requeue delay (BeginTime, cred_expire + 1 s: a job
    started sooner is killed with "Job credential revoked"); once that has passed it is
    released at once rather than at the scheduler's next periodic pass, so that the tests
    do not idle. ``poll(info)`` runs at every poll.
    """
    deadline = time.time() + timeout
    info: dict[str, str] = {}
    while time.time() < deadline:
        info = job_info(job_id) or info
        if poll is not None:
            poll(info)
        state = info.get("JobState", "")
        if state in FINAL:
            return info
        if (state == "PENDING" and info.get("Reason") == "BeginTime" and info.get("Restarts", "0") != "0"
                and _begin_passed(info.get("StartTime", ""))):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)], capture_output=True)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {info}")


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_steps(records: list[dict]) -> list[int]:
    """Steps of the training records (those with a loss), in the order written."""
    return [r["step"] for r in records if r.get("split") == "train" and "loss" in r]


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<no log at {path}>"
