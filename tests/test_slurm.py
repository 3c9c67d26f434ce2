"""The sbatch scripts and the submitit launcher against a real Slurm cluster.

The cluster is started by .ci/slurm_up.sh before pytest; without it the cluster
tests skip and say so. The dry-run tests of the scripts' command line need no
cluster. Jobs run the tiny model on CPU (2 gloo ranks of FSDP2).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _slurm as S  # noqa: E402

REASON = S.cluster_reason()
cluster = pytest.mark.skipif(REASON is not None, reason=f"no Slurm cluster: {REASON}")
SCRIPTS = ["caldpo_tldr.sh", "caldpo_hh.sh", "sft_tldr.sh", "sft_hh.sh"]
N_EXAMPLES = 240  # 60 optimizer steps of 4 examples
STEPS = N_EXAMPLES // 4


# ----------------------------------------------------------------------------- dry runs (no cluster)

def dry_run(script: str, args: list[str], env: dict | None = None, cwd: Path = S.REPO):
    """Run a script outside Slurm with CALDPO_DRY_RUN=1; (rc, launch words, all output)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RUN_DIR", "SFT_ARCHIVE")}
    full = {**clean, "CALDPO_DRY_RUN": "1", **(env or {})}
    out = subprocess.run(["bash", str(S.REPO / "slurm" / script), *args], capture_output=True, text=True,
                         env=full, cwd=cwd, timeout=60)
    words = []
    for line in out.stdout.splitlines():
        if line.startswith("DRY RUN:"):
            words = subprocess.run(["bash", "-c", 'for w in ' + line[len("DRY RUN:"):] + '; do echo "$w"; done'],
                                   capture_output=True, text=True).stdout.splitlines()
    return out.returncode, words, out.stdout + out.stderr


def trainer_args(words: list[str]) -> list[str]:
    return words[words.index("-m", words.index("torch.distributed.run") + 1) + 2:]


def test_multinode_command_line(tmp_path):
    """A 2-node job: one torchrun per node via srun, c10d rendezvous on the first node."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "cd", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_CPUS_PER_TASK": "32", "SFT_ARCHIVE": "/sft/LATEST/policy.pt"}
    rc, words, out = dry_run("caldpo_tldr.sh", ["batch_size=8", "lr=1e-6"], env, cwd=tmp_path)
    assert rc == 0, out
    assert words[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                         "--cpus-per-task=32"], words
    head = "gpu07" if shutil.which("scontrol") else "gpu[07-08]"
    for w in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_id=4242"):
        assert w in words, (w, words)
    assert any(w.startswith(f"--rdzv_endpoint={head}:") for w in words), words
    args = trainer_args(words)
    assert words[words.index("--max_restarts=0") + 1:words.index("--max_restarts=0") + 3] == ["-m", "caldpo.train"]
    for want in ("model=pythia28", "datasets=[tldr]", "loss=caldpo", "loss.beta=0.001", "trainer=FSDPTrainer",
                 "model.fsdp_policy_mp=bfloat16", "gradient_accumulation_steps=2", "eval_batch_size=32",
                 "sample_during_eval=false", "model.archive=/sft/LATEST/policy.pt", "lr=1e-6",
                 f"run_dir={tmp_path}/runs/cd_4242"):
        assert want in args, (want, args)
    # the command line replaces the default: one key never appears twice (Hydra refuses that)
    assert [a for a in args if a.startswith("batch_size=")] == ["batch_size=8"]


@pytest.mark.parametrize("script,loss,dataset,beta", [
    ("caldpo_tldr.sh", "caldpo", "tldr", "0.001"), ("caldpo_hh.sh", "caldpo", "hh", "0.1"),
    ("sft_tldr.sh", "sft", "tldr", None), ("sft_hh.sh", "sft", "hh", None)])
def test_script_defaults(script, loss, dataset, beta, tmp_path):
    env = {"SFT_ARCHIVE": "/a/policy.pt", "NPROC_PER_NODE": "3", "RUN_DIR": str(tmp_path / "r"),
           "PYTHON": "/opt/py/bin/python"}
    rc, words, out = dry_run(script, ["+data.paths.x=1", "~wandb"], env)
    assert rc == 0, out
    assert words[0] == "/opt/py/bin/python" and "--nproc_per_node=3" in words and "--nnodes=1" in words
    args = trainer_args(words)
    assert f"loss={loss}" in args and f"datasets=[{dataset}]" in args and "model=pythia28" in args
    assert ([a for a in args if a.startswith("loss.beta=")] == [f"loss.beta={beta}"]) if beta else \
        not any(a.startswith("loss.beta=") for a in args)
    assert ("model.archive=/a/policy.pt" in args) == (loss == "caldpo")
    assert args[-3:] == ["+data.paths.x=1", "~wandb", f"run_dir={tmp_path / 'r'}"]


def test_caldpo_needs_an_archive():
    rc, words, out = dry_run("caldpo_hh.sh", [])
    assert rc == 2 and "SFT_ARCHIVE" in out and not words
    rc, words, out = dry_run("caldpo_hh.sh", ["model.archive=null", "run_dir=rel/dir"])
    assert rc == 0, out
    args = trainer_args(words)
    assert "model.archive=null" in args and args[-1] == f"run_dir={S.REPO}/rel/dir"


def test_cpu_option_replaces_the_gpu_defaults():
    """CALDPO_CPU=1: device=cpu and no bf16 mixed precision in place of the scripts' GPU defaults; the command
    line still wins."""
    rc, words, out = dry_run("caldpo_tldr.sh", ["model.archive=null"], {"CALDPO_CPU": "1"})
    assert rc == 0, out
    args = trainer_args(words)
    assert "device=cpu" in args and "model.fsdp_policy_mp=null" in args, args
    assert not any(a == "model.fsdp_policy_mp=bfloat16" for a in args)
    rc, words, out = dry_run("caldpo_tldr.sh", ["model.archive=null", "model.fsdp_policy_mp=float32"], {"CALDPO_CPU": "1"})
    args = trainer_args(words)
    assert [a for a in args if a.startswith("model.fsdp_policy_mp=")] == ["model.fsdp_policy_mp=float32"], args


def test_the_readmes_local_example_runs_offline(tmp_path):
    """slurm/README.md's run outside Slurm, as written there, with the hub unreachable: one local torchrun of
    the tiny model on the shipped sample, to DONE."""
    text = (S.REPO / "slurm" / "README.md").read_text()
    command = next(line for line in text.splitlines() if line.startswith("CALDPO_CPU=1 bash slurm/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("SFT_ARCHIVE", "RUN_DIR")}
    env.update(HF_HUB_OFFLINE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=S.REPO, timeout=600)
    assert out.returncode == 0, (command, out.stdout[-3000:], out.stderr[-3000:])
    assert (tmp_path / "run" / "DONE").exists() and "device=cpu" in out.stdout, out.stdout[-3000:]


def test_submit_needs_a_run_script():
    out = subprocess.run(["bash", str(S.REPO / "slurm" / "submit.sh"), "--time=5"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "slurm/<script>.sh" in out.stderr, out.stderr


# ----------------------------------------------------------------------------- checks at submission (submit.sh)

def _refused(out: subprocess.CompletedProcess, *wanted: str) -> str:
    """A refusal: exit 2 and one `caldpo:` line on stderr holding every ``wanted`` text; nothing from sbatch."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("caldpo: "), (out.returncode, out.stderr)
    for w in wanted:
        assert w in lines[0], (w, lines[0])
    assert "Submitted batch job" not in out.stdout and "Traceback" not in out.stderr
    return lines[0]


@cluster
def test_submit_refuses_a_typo_before_queueing(tmp_path, tldr_file):
    """A misspelt override is named at submission, with the key it meant; no job is queued."""
    name = f"typo_{os.getpid()}"
    args = [*tiny_args(tldr_file, tmp_path / "run"), "batchsize=4"]
    out = S.submit_sh("caldpo_tldr.sh", args, sbatch_opts=[f"--job-name={name}", "--time=5"],
                      env={"CALDPO_CPU": "1"}, cwd=tmp_path)
    _refused(out, "batchsize: unknown option; did you mean batch_size?")
    assert S.jobs_named(name) == [] and not (tmp_path / "run").exists()


@cluster
def test_submit_refuses_a_missing_sft_archive(tmp_path, tldr_file):
    """Cal-DPO without SFT_ARCHIVE, or with one that is not there: refused at submission, nothing queued."""
    name = f"noarchive_{os.getpid()}"
    args = [a for a in tiny_args(tldr_file, tmp_path / "run") if not a.startswith("model.archive=")]
    out = S.submit_sh("caldpo_tldr.sh", args, sbatch_opts=[f"--job-name={name}"], env={"CALDPO_CPU": "1"},
                      cwd=tmp_path)
    _refused(out, "SFT_ARCHIVE=<sft run dir>/LATEST/policy.pt")
    missing = tmp_path / "sft" / "LATEST" / "policy.pt"
    out = S.submit_sh("caldpo_tldr.sh", args, sbatch_opts=[f"--job-name={name}"],
                      env={"CALDPO_CPU": "1", "SFT_ARCHIVE": str(missing)}, cwd=tmp_path)
    _refused(out, f"model.archive={missing}: no such file")
    assert S.jobs_named(name) == []


@cluster
def test_submit_refuses_gpus_a_partition_does_not_have(tmp_path, tldr_file):
    """The scripts ask for 8 GPUs per node; on this CPU-only partition Slurm would leave such a job pending
    forever. submit.sh says so, names the CPU option, and queues nothing."""
    from caldpo.launch import partitions
    found = partitions()
    if found is None or found[0].get(found[1], 0) >= 8:
        pytest.skip(f"the default partition has GPUs here ({found}); the refusal needs one without")
    name = f"gpus_{os.getpid()}"
    out = S.submit_sh("sft_tldr.sh", tiny_args(tldr_file, tmp_path / "run"), sbatch_opts=[f"--job-name={name}"],
                      cwd=tmp_path)
    _refused(out, f"partition {found[1]} has no GPUs", "asks for 8 per node", "pending forever", "CALDPO_CPU=1")
    assert S.jobs_named(name) == []


@cluster
def test_cpu_option_runs_on_a_cpu_node(tmp_path, tldr_file):
    """CALDPO_CPU=1 slurm/submit.sh with no GPU option at all: the checks pass, the job gets no GPUs, runs on
    CPU and finishes."""
    name = f"cpu_{os.getpid()}"
    run_dir, log = tmp_path / "run", tmp_path / "cpu.out"
    args = [a for a in tiny_args(tldr_file, run_dir) if not a.startswith(("n_examples=", "device=",
                                                                          "model.fsdp_policy_mp="))]
    out = S.submit_sh("sft_tldr.sh", [*args, "n_examples=8"],
                      sbatch_opts=[f"--job-name={name}", "--cpus-per-task=1", "--mem=3G", "--time=10",
                                   f"--output={log}"], env={"CALDPO_CPU": "1", "NPROC_PER_NODE": "1"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "caldpo: submission checks passed:" in out.stdout and "device=cpu" in out.stdout, out.stdout
    job = int(out.stdout.split("Submitted batch job")[1].split()[0])
    info = S.wait_job(job, 300)
    assert_completed(info, run_dir, log)
    assert info.get("TresPerNode", "") in ("", "gres:gpu:0", "gpu:0") and "gpu:8" not in str(info), info
    text = S.log_text(log)
    assert "device=cpu" in text and "model.fsdp_policy_mp=null" in text and "world=1" in text, text[-3000:]


@cluster
def test_a_job_with_a_typo_ends_with_one_line_and_status_2(tmp_path, tldr_file):
    """Submitted with plain sbatch (no checks at submission), the job's own preflight stops it before torchrun:
    one `caldpo:` line, exit status 2, no traceback."""
    log = tmp_path / "typo.out"
    job = S.sbatch("sft_tldr.sh", [*tiny_args(tldr_file, tmp_path / "run"), "batchsize=4"],
                   sbatch_opts=[*S.CPU_SBATCH, "--cpus-per-task=1", "--mem=2G", f"--output={log}"], cwd=tmp_path)
    info = S.wait_job(job, 120)
    text = S.log_text(log)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", (info, text)
    errors = [line for line in text.splitlines() if line.startswith("caldpo:")]
    assert errors == ["caldpo: config error: batchsize: unknown option; did you mean batch_size? "
                      "(python -m caldpo.train --help lists every option)"], text
    assert "Traceback" not in text and "torch.distributed.run" not in text, text


# ----------------------------------------------------------------------------- real jobs

@pytest.fixture(scope="module")
def tldr_file(tmp_path_factory):
    return S.write_tldr_sample(tmp_path_factory.mktemp("data") / "tldr_comparisons.jsonl")


def tiny_args(tldr: Path, run_dir: Path, **extra) -> list[str]:
    args = [*S.TINY_TLDR, "datasets=[tldr]", f"data.paths.tldr={tldr}", f"n_examples={N_EXAMPLES}",
            f"run_dir={run_dir}"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def submit_tldr(tmp: Path, tldr: Path, name: str, **extra) -> tuple[int, Path, Path]:
    run_dir, log = tmp / name, tmp / f"{name}.out"
    job = S.sbatch("caldpo_tldr.sh", tiny_args(tldr, run_dir, **extra),
                   sbatch_opts=[*S.CPU_SBATCH, f"--job-name={name}", f"--output={log}"],
                   env={"NPROC_PER_NODE": "2"}, cwd=tmp)
    return job, run_dir, log


def assert_completed(info: dict, run_dir: Path, log: Path) -> None:
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", \
        f"{info.get('JobState')} {info.get('ExitCode')}\n{S.log_text(log)[-5000:]}"
    assert (run_dir / "DONE").exists(), S.log_text(log)[-5000:]


@cluster
def test_sbatch_dry_run_from_another_dir(tmp_path):
    """sbatch runs a spooled copy of the script: it must still find slurm/common.sh."""
    log = tmp_path / "dry.out"
    job = S.sbatch("sft_hh.sh", ["model=tiny"], sbatch_opts=[*S.CPU_SBATCH, f"--output={log}"],
                   env={"CALDPO_DRY_RUN": "1", "NPROC_PER_NODE": "2"}, cwd=tmp_path)
    info = S.wait_job(job, 60)
    text = S.log_text(log)
    assert info["JobState"] == "COMPLETED", text
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert "DRY RUN: srun --nodes=1 --ntasks=1" in text, text
    assert f"--rdzv_endpoint={host}:" in text and f"--rdzv_id={job}" in text and "--nproc_per_node=2" in text
    assert f"run_dir={tmp_path}/runs/sft_hh_{job}" in text, text


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tldr_file):
    """An uninterrupted Cal-DPO run through slurm/caldpo_tldr.sh: (run_dir, log, scontrol info)."""
    if REASON:
        pytest.skip(f"no Slurm cluster: {REASON}")
    tmp = tmp_path_factory.mktemp("baseline")
    job, run_dir, log = submit_tldr(tmp, tldr_file, "baseline")
    info = S.wait_job(job, 240)
    return run_dir, log, info


@cluster
def test_caldpo_tldr_job(baseline):
    import torch
    run_dir, log, info = baseline
    assert_completed(info, run_dir, log)
    assert info.get("Restarts") == "0"
    records = S.read_records(run_dir)
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert train[-1]["examples"] == N_EXAMPLES
    for key in ("loss", "rewards/accuracies", "rewards/margins", "loss/calibration"):
        assert all(key in r for r in train), key
    assert not any("resumed_from_step" in r for r in records)
    assert train[-1]["loss"] < train[0]["loss"]  # the tiny model does learn the toy preference
    policy = torch.load(run_dir / "LATEST" / "policy.pt", map_location="cpu", weights_only=True)
    assert policy["step_idx"] == N_EXAMPLES and policy["state"]  # examples seen, as the reference
    text = S.log_text(log)
    assert "--nproc_per_node=2" in text and "world=2" in text, text[-3000:]


def run_interrupted(tmp: Path, tldr: Path, name: str, interrupt) -> tuple[dict, Path, Path]:
    """Submit, call ``interrupt(job)`` once the first resume checkpoint exists, wait."""
    job, run_dir, log = submit_tldr(tmp, tldr, name, save_every=5)
    fired = []

    def poll(info):
        if not fired and info.get("JobState") == "RUNNING" and glob.glob(str(run_dir / "checkpoints" / "step_*")):
            interrupt(job)
            fired.append(True)

    info = S.wait_job(job, 360, poll)
    assert fired, f"the job ended before its first checkpoint\n{S.log_text(log)[-3000:]}"
    return info, run_dir, log


def assert_resumed_like(baseline, info: dict, run_dir: Path, log: Path) -> None:
    """Resumed (not restarted) and ends where the uninterrupted run ends, with its losses."""
    assert_completed(info, run_dir, log)
    assert int(info.get("Restarts", "0")) >= 1, info
    records = S.read_records(run_dir)
    resumed = [r["resumed_from_step"] for r in records if "resumed_from_step" in r]
    assert resumed and all(s > 0 for s in resumed), S.log_text(log)[-4000:]
    steps = S.train_steps(records)
    assert steps[0] == 1 and steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))
    assert steps.count(1) == 1  # never started again from scratch
    base = {r["step"]: r for r in S.read_records(baseline[0]) if r.get("split") == "train" and "loss" in r}
    last = {r["step"]: r for r in records if r.get("split") == "train" and "loss" in r}
    assert max(last) == max(base)
    for step in (resumed[0] + 1, STEPS):
        assert last[step]["loss"] == pytest.approx(base[step]["loss"], rel=1e-4), step


@cluster
def test_scontrol_requeue_resumes(baseline, tmp_path, tldr_file):
    """`scontrol requeue` of a running job (as preemption does): SIGTERM, checkpoint, rerun resumes."""
    info, run_dir, log = run_interrupted(
        tmp_path, tldr_file, "requeued",
        lambda job: subprocess.run(["scontrol", "requeue", str(job)], check=True, capture_output=True))
    assert_resumed_like(baseline, info, run_dir, log)
    assert "SIGTERM: asking the trainer" in S.log_text(log)


@cluster
def test_time_limit_signal_requeues(baseline, tmp_path, tldr_file):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends): STOP file, checkpoint, self-requeue."""
    info, run_dir, log = run_interrupted(
        tmp_path, tldr_file, "usr1",
        lambda job: subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True,
                                   capture_output=True))
    assert_resumed_like(baseline, info, run_dir, log)
    text = S.log_text(log)
    assert "SIGUSR1: asking the trainer" in text and "requeueing job" in text, text[-4000:]
    assert not (run_dir / "STOP").exists()


@cluster
def test_submitit_launch_preempted_and_resumed(baseline, tmp_path, tldr_file):
    """caldpo.launch.submit on the cluster, preempted with submitit's signal, requeued, resumed."""
    from caldpo import launch

    run_dir = tmp_path / "submitit_run"
    # the same training as slurm/caldpo_tldr.sh runs in the baseline
    overrides = ["loss=caldpo", "loss.beta=0.001", *tiny_args(tldr_file, tmp_path / "ignored", save_every=5)]
    job = launch.submit(overrides, nodes=1, gpus_per_node=0,
                        tasks_per_node=2, cpus_per_task=1, mem="6G", time_min=10, executor="slurm",
                        log_dir=tmp_path / "logs", run_dir=run_dir, job_name="submitit_tldr")
    fired = []

    def poll(info):
        if not fired and info.get("JobState") == "RUNNING" and glob.glob(str(run_dir / "checkpoints" / "step_*")):
            subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
            fired.append(True)

    info = S.wait_job(int(job.job_id), 360, poll)
    logs = "\n".join(S.log_text(Path(p)) for p in glob.glob(str(tmp_path / "logs" / "*" / "*_0_log.*")))
    assert fired, logs[-5000:]
    assert_resumed_like(baseline, info, run_dir, tmp_path / "logs" / "none")
    result = job.results()[0]
    assert result["step"] == STEPS and Path(result["run_dir"]) == run_dir, logs[-5000:]
    assert "Requeued job" in logs and "stop requested" in logs, logs[-5000:]
