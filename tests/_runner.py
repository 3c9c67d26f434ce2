"""A fork server for many short training processes (the fault-injection tests).

Starting ``python -m caldpo.train`` costs seconds of imports before any work; the fault
tests run dozens of real processes. The server imports caldpo, torch and transformers once
and forks one child per process asked for; each child runs ``caldpo.train.__main__.cli``
with its own arguments, environment and log file, in a new session, and exits with its
status (or dies by the signal a fault point sends it). A job of several processes with
``WORLD_SIZE`` set is one multi-process (FSDP) run; when one of its processes dies, the
server SIGKILLs the others, as torchrun's agent does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SERVER = r'''
import json, os, signal, sys, traceback
import torch, torch.distributed.checkpoint  # noqa: F401  (warm imports shared by every child)
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
import caldpo.train.trainer  # noqa: F401
from caldpo.train.__main__ import cli
from caldpo.train.tiny import tiny_model_dir
tiny_model_dir()
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pids = []
    for proc in job["procs"]:
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                os.setsid()
                fd = os.open(proc["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(proc["env"])
                os.chdir(job["cwd"])
                rc = cli(job["args"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        pids.append(pid)
    codes = {}
    while len(codes) < len(pids):
        pid, status = os.wait()
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and job["linked"]:
            for other in pids:
                if other not in codes:
                    try:
                        os.kill(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    print(json.dumps({"codes": [codes[p] for p in pids]}), flush=True)
'''


class ForkServer:
    """``run(args, ...)`` -> (exit codes, log texts); one process (or one multi-process job) at a time."""

    def __init__(self, env: dict | None = None):
        full = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                **(env or {})}
        for k in ("CALDPO_FAULT", "CALDPO_FAULT_RANK", "CALDPO_FAULT_SIGNAL", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            full.pop(k, None)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=REPO, env=full, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lock = threading.Lock()
        ready = self.proc.stdout.readline()
        if not ready.startswith('{"ready"'):
            raise RuntimeError(f"fork server did not start: {ready!r}")

    def run(self, args: list[str], log: Path, *, env: dict | None = None, world: int = 1,
            rank_env: dict[int, dict] | None = None, linked: bool = True,
            parallel: int = 1) -> tuple[list[int], list[str]]:
        """Run ``python -m caldpo.train args`` as ``world`` ranks of one run (``world`` > 1: FSDP over gloo),
        or ``parallel`` independent copies (``linked=False``). Returns the exit codes (negative: killed by
        that signal) and the log of each process."""
        procs = []
        n = world if world > 1 else parallel
        for i in range(n):
            e = {k: str(v) for k, v in (env or {}).items()}
            if world > 1:
                e.update(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()) if i == 0 else "")
            e.update({k: str(v) for k, v in ((rank_env or {}).get(i) or {}).items()})
            procs.append({"env": e, "log": str(log.with_name(f"{log.name}.{i}") if n > 1 else log)})
        if world > 1:
            for p in procs[1:]:
                p["env"]["MASTER_PORT"] = procs[0]["env"]["MASTER_PORT"]
        with self.lock:
            self.proc.stdin.write(json.dumps({"procs": procs, "args": args, "cwd": str(REPO),
                                              "linked": linked and world > 1}) + "\n")
            self.proc.stdin.flush()
            result = json.loads(self.proc.stdout.readline())
        return result["codes"], [Path(p["log"]).read_text() for p in procs]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # idle between jobs: nothing to clean up
            self.proc.wait()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
