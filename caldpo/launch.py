"""Submit a caldpo training run with submitit (Slurm, or locally without Slurm).

    python -m caldpo.launch --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 \\
        -- model=pythia28 datasets=[hh] loss=caldpo loss.beta=0.1 model.archive=runs/sft_hh/LATEST/policy.pt

One Slurm task per GPU runs ``caldpo.train.main`` with torch.distributed set up
from the job's environment (rank 0's node is the rendezvous host). On preemption
or before the time limit submitit signals the tasks; ``Train.checkpoint`` asks the
trainer to stop at the next step boundary (it writes a resume checkpoint) and has
submitit requeue the same callable, which resumes from ``run_dir``.
``--gpus-per-node 0`` runs on CPUs (``device=cpu``, ``--tasks-per-node`` tasks).

Nothing is queued that cannot run (``check_submission``, also what ``slurm/submit.sh`` runs
through ``--check-only``): GPUs asked of a partition that has none (or fewer per node), which
Slurm would leave pending forever, and the trainer's preflight of the overrides for the job's
world size (unknown keys, bad values, missing archive or data paths) stop the submission with
one ``caldpo: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit

EXECUTORS = ("slurm", "local", "debug")


class SubmitError(Exception):
    """A job that must not be queued (it would pend forever); printed as one ``caldpo:`` line, exit 2."""

    exit_code = 2


def partitions() -> tuple[dict[str, int], str | None] | None:
    """({partition: the most GPUs any of its nodes has}, the default partition) from ``sinfo``'s GRES
    column (``gpu:8``, ``gpu:a100:8(S:0-1)``; ``(null)``: none). None when ``sinfo`` is missing or does
    not answer: nothing to check against."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    gpus: dict[str, int] = {}
    default = None
    for line in out.stdout.split():
        name, _, gres = line.partition("|")
        if name.endswith("*"):
            name = default = name[:-1]
        counts = [int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres)]
        gpus[name] = max([gpus.get(name, 0), *counts])
    return gpus, default


def check_partition(partition: str | None, gpus_per_node: int, cpu_hint: str) -> None:
    """Refuse a job that asks ``gpus_per_node`` GPUs of a partition whose nodes have fewer (none on a
    CPU cluster): Slurm would queue it and leave it pending forever (Reason=PartitionConfig); also a
    partition the cluster does not have. ``partition`` None: the cluster's default. ``cpu_hint``: how
    this entry point runs on CPUs instead. Raises SubmitError."""
    found = partitions()
    if found is None:
        return
    gpus, default = found
    name = partition or default
    if name is None:
        return
    if name not in gpus:
        raise SubmitError(f"partition {name!r} does not exist on this cluster; its partitions: {', '.join(gpus)}")
    if gpus_per_node <= gpus[name]:
        return
    with_gpus = [p for p, n in gpus.items() if n >= gpus_per_node]
    where = (f"partitions with {gpus_per_node} GPUs per node: {', '.join(with_gpus)}" if with_gpus
             else "no partition of this cluster has them")
    has = "has no GPUs" if gpus[name] == 0 else f"has at most {gpus[name]} GPUs per node"
    raise SubmitError(f"partition {name} {has} and this job asks for {gpus_per_node} per node: Slurm would leave "
                      f"it pending forever (Reason=PartitionConfig). To run on its CPUs: {cpu_hint}; for GPUs, "
                      f"pick a partition ({where})")


def check_submission(overrides: list[str], *, nodes: int, tasks_per_node: int, gpus_per_node: int,
                     partition: str | None, executor: str = "slurm",
                     cpu_hint: str = "python -m caldpo.launch --gpus-per-node 0 ...") -> str:
    """The checks before a job is queued: the partition has the GPUs asked (Slurm only), then the trainer's
    preflight (``caldpo.train.config.preflight``) of ``overrides`` for ``nodes * tasks_per_node``
    processes; for Slurm without this machine's devices (the job's node repeats them). Returns the
    preflight's one-line summary; raises SubmitError or ConfigError."""
    from caldpo.train.config import preflight, preflight_summary

    if executor == "slurm":
        check_partition(partition, gpus_per_node, cpu_hint)
    world = nodes * tasks_per_node
    cfg = preflight(list(overrides), world_size=world, on_node=executor != "slurm")
    return preflight_summary(cfg, world)


def _override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def _with_default(overrides: list[str], key: str, value: str) -> list[str]:
    """Append ``key=value`` unless the overrides set ``key`` already."""
    return overrides if any(_override_key(o) == key for o in overrides) else [*overrides, f"{key}={value}"]


class Train:
    """The submitted callable: one instance per task, picklable, requeue-safe.

    Training runs in a worker thread so that the main thread stays free for
    submitit's preemption handler: ``checkpoint`` can then wait for the trainer
    to finish its stop checkpoint before the job is requeued.
    """

    def __init__(self, overrides: list[str], run_dir: str, stop_wait_s: float = 60.0):
        self.overrides = list(overrides)
        self.run_dir = str(run_dir)
        self.stop_wait_s = stop_wait_s
        self._done = threading.Event()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_done"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._done = threading.Event()

    def _set_dist_env(self) -> None:
        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                          LOCAL_RANK=str(env.local_rank),
                          LOCAL_WORLD_SIZE=str(max(1, env.num_tasks // max(1, env.num_nodes))))
        os.environ["MASTER_ADDR"] = env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1"
        try:
            job = int(str(env.job_id).split("_")[0])
        except ValueError:
            job = os.getpid()
        # A port per job: jobs sharing a node must not share a rendezvous port.
        os.environ["MASTER_PORT"] = str(40000 + job % 20000)

    def __call__(self) -> dict:
        self._set_dist_env()
        from caldpo.train import main

        overrides = [o for o in self.overrides if _override_key(o) != "run_dir"] + [f"run_dir={self.run_dir}"]
        box: dict = {}

        def work():
            try:
                box["result"] = main(overrides)
            except BaseException as e:  # re-raised in the main thread
                box["error"] = e
            finally:
                self._done.set()

        self._done.clear()
        thread = threading.Thread(target=work, name="caldpo-train", daemon=True)
        thread.start()
        while not self._done.wait(0.5):  # short waits keep signal handlers responsive
            pass
        thread.join()
        if "error" in box:
            raise box["error"]
        result = box["result"]
        if isinstance(result, dict) and result.get("stopped") and os.environ["RANK"] != "0" \
                and "SLURM_JOB_ID" in os.environ:
            # Rank 0 is requeueing the job: finishing here would leave a stale
            # "stopped" result for this task that outlives the requeue.
            time.sleep(self.stop_wait_s + 60)
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Stop the trainer at a step boundary (it saves a resume checkpoint), then requeue."""
        from caldpo.train.rundir import clear_stop, request_stop

        stop = request_stop(self.run_dir)
        print(f"caldpo.launch: stop requested ({stop}); waiting up to {self.stop_wait_s:.0f}s for the checkpoint",
              file=sys.stderr, flush=True)
        if not self._done.wait(self.stop_wait_s):
            print("caldpo.launch: trainer still running; requeueing anyway (resumes from the last checkpoint)",
                  file=sys.stderr, flush=True)
        clear_stop(self.run_dir)
        return submitit.helpers.DelayedSubmission(Train(self.overrides, self.run_dir, self.stop_wait_s))


def prepare(overrides: list[str], *, nodes: int = 1, gpus_per_node: int = 8, tasks_per_node: int | None = None,
            cpus_per_task: int | None = None, partition: str | None = None, time_min: int = 24 * 60,
            mem: str | None = None, sbatch: dict | None = None, executor: str = "slurm",
            log_dir: str | Path = "logs/submitit", run_dir: str | Path | None = None, job_name: str = "caldpo",
            signal_delay_s: int = 120, stop_wait_s: float = 60.0) -> tuple[submitit.AutoExecutor, Train]:
    """The configured executor and the callable that ``submit`` submits (see there)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, not {executor!r}")
    overrides = list(overrides)
    nodes, gpus_per_node, tasks_per_node = _shape(executor, nodes, gpus_per_node, tasks_per_node)
    if gpus_per_node == 0:
        overrides = _with_default(overrides, "device", "cpu")
    if run_dir is None:
        given = [o.split("=", 1)[1] for o in overrides if _override_key(o) == "run_dir"]
        run_dir = given[-1] if given else f"runs/{job_name}_{time.strftime('%Y%m%d_%H%M%S')}"
    run_dir = str(Path(run_dir).absolute())

    ex = submitit.AutoExecutor(folder=str(Path(log_dir).absolute() / "%j"), cluster=executor)
    params: dict = dict(name=job_name, timeout_min=int(time_min), nodes=nodes, tasks_per_node=tasks_per_node)
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if executor == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s
        if partition:
            params["slurm_partition"] = partition
        if mem:
            params["slurm_mem"] = mem
        extra = {"requeue": True, "open-mode": "append", **(sbatch or {})}
        params["slurm_additional_parameters"] = {k.replace("-", "_"): v for k, v in extra.items()}
    ex.update_parameters(**params)
    return ex, Train(overrides, run_dir, stop_wait_s)


def _shape(executor: str, nodes: int, gpus_per_node: int, tasks_per_node: int | None) -> tuple[int, int, int]:
    """(nodes, GPUs per node, tasks per node) of a job: one task per GPU by default; one CPU task off Slurm."""
    if executor != "slurm":
        return 1, 0, 1
    return nodes, gpus_per_node, max(1, gpus_per_node) if tasks_per_node is None else tasks_per_node


def submit(overrides: list[str], **options) -> submitit.Job:
    """Submit one training run; returns the submitit job (``job.results()[0]`` is rank 0's summary).

    Options: nodes, gpus_per_node (GPUs and as many tasks per node; 0 means a CPU
    run with ``device=cpu``), tasks_per_node, cpus_per_task, partition, time_min,
    mem ("500G"), sbatch (extra sbatch parameters), executor ("slurm"; "local" runs
    one task as a local process, "debug" in this process, both on CPU unless the
    overrides say ``device=...``), log_dir, run_dir (default runs/<job_name>_<time>),
    job_name, signal_delay_s (checkpoint this long before the time limit),
    stop_wait_s (how long ``checkpoint`` waits for the trainer's stop checkpoint).
    ``check_submission`` runs first: a job that cannot run raises SubmitError or ConfigError
    and nothing is queued.
    """
    ex, fn = prepare(overrides, **options)
    opts = {k: p.default for k, p in inspect.signature(prepare).parameters.items() if k != "overrides"} | options
    nodes, gpus, tasks = _shape(opts["executor"], opts["nodes"], opts["gpus_per_node"], opts["tasks_per_node"])
    check_submission(fn.overrides, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus,
                     partition=opts["partition"], executor=opts["executor"])
    return ex.submit(fn)


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.lstrip("-"), v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m caldpo.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node = tasks per node (default 8); 0 for a CPU run")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: --gpus-per-node (1 when it is 0)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 1440)")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 500G (sbatch --mem)")
    p.add_argument("--sbatch", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="additional sbatch parameter, e.g. --sbatch account=myproj (repeatable)")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm",
                   help="slurm, local (subprocess, no Slurm) or debug (this process)")
    p.add_argument("--log-dir", default="logs/submitit", help="submitit folder for logs and pickles")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<job name>_<time>)")
    p.add_argument("--job-name", default="caldpo")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--check-only", action="store_true",
                   help="run the submission checks (the partition has the GPUs asked, the trainer's preflight of "
                        "the overrides for nodes x tasks processes) and exit 0, or 2 naming the problem; "
                        "submit nothing")
    p.add_argument("--cpu-hint", default="python -m caldpo.launch --gpus-per-node 0 ...", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="training overrides key=value (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    from caldpo.cli import run

    args = build_parser().parse_args(argv)
    if args.check_only:
        nodes, gpus, tasks = _shape(args.executor, args.nodes, args.gpus_per_node, args.tasks_per_node)
        overrides = args.overrides if gpus else _with_default(args.overrides, "device", "cpu")

        def check() -> None:
            summary = check_submission(overrides, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus,
                                       partition=args.partition, executor=args.executor, cpu_hint=args.cpu_hint)
            print(f"caldpo: submission checks passed: {summary}", flush=True)
        return run(check, errors=(SubmitError,))

    def launch() -> int:
        job = submit(args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
                     time_min=args.time, mem=args.mem, sbatch=dict(args.sbatch), executor=args.executor,
                     log_dir=args.log_dir, run_dir=args.run_dir, job_name=args.job_name,
                     signal_delay_s=args.signal_delay)
        print(f"submitted job {job.job_id} (logs: {job.paths.folder})", flush=True)
        if args.wait:
            result = job.results()[0]
            print(result, flush=True)
            return 0 if result and not (isinstance(result, dict) and result.get("stopped")) else 1
        return 0
    return run(launch, errors=(SubmitError,))


if __name__ == "__main__":
    sys.exit(main())
