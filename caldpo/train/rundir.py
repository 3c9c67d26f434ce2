"""The run directory's process protocol: one writer (a lock), stop requests, and workers tied to their launcher.

- ``RunLock``: ``fcntl.flock`` on ``<run_dir>/.lock``, taken by rank 0 before anything in the
  run directory is written and held for the life of the process; the file records the holder's
  PID, host and start time, so a second run on the same directory stops with a one-line
  ``RunError`` naming it. The kernel releases the lock when the holder dies, even by SIGKILL,
  so a stale ``.lock`` file never blocks a rerun.
- ``StopSignals``: SIGTERM / SIGUSR1 (Slurm preemption, submitit) and the first SIGINT (Ctrl-C) ask
  the trainer to checkpoint at the next step boundary and exit; a second SIGINT exits at once
  (status 130). The resume checkpoint protocol (checkpoint.py) makes both safe.
- ``exit_with_launcher``: a torchrun worker whose launcher dies (``kill -9`` of torchrun, a lost
  node agent) exits within a second instead of training on alone.

- ``STOP`` (``<run_dir>/STOP``): any process may ask the run to checkpoint and exit at the next
  step boundary by creating it (``request_stop``: ``caldpo.launch`` before a requeue, the sbatch
  scripts on a signal, a user by hand); the trainer removes it when it has stopped.
- ``DONE`` (``<run_dir>/DONE``): the finished run's summary (JSON), written last and atomically
  (``write_done``); a run directory holding it is finished, and rerunning the command prints it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from caldpo.files import free_space, json_text, os_reason, write_output

from .faults import fault_point

STOP = "STOP"
DONE = "DONE"


class RunError(RuntimeError):
    """A run that cannot start or continue safely; the message names the file or process and what to do.

    ``exit_code`` is the process exit status ``python -m caldpo.train`` returns for it.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class RunLock:
    """An exclusive lock on ``run_dir`` held until ``release`` or the end of the process."""

    def __init__(self, run_dir: Path):
        import fcntl
        self.path = run_dir / ".lock"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot write run_dir {run_dir}: {os_reason(e)} ({free_space(run_dir)}); a run writes "
                           "its checkpoints, metrics and exports there. Choose a writable run_dir= (or "
                           "local_run_root=), or make this one writable") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            for _ in range(40):  # the holder writes its PID right after taking the lock: give it a moment
                if holder.get("pid"):
                    break
                time.sleep(0.05)
                holder = self._holder()
            os.close(self.fd)
            self.fd = None
            who = (f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"
                   if holder else "another process")
            raise RunError(f"run_dir {run_dir} is in use by {who}: one run writes a run directory at a time; "
                           "wait for it to finish (or stop it), or choose another run_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def _holder(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 65536, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """Under torchrun, exit this worker (status 1) as soon as its launcher is gone.

    The parent's death is detected by the parent PID changing (the worker is re-parented), polled by a
    daemon thread; ``os._exit`` because a worker without its launcher cannot finish a collective anyway.
    No-op outside torchrun (``TORCHELASTIC_RUN_ID`` unset).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                sys.stderr.write(f"caldpo: rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) "
                                 "is gone; exiting\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="caldpo-launcher-watch", daemon=True).start()


class StopSignals:
    """Turns SIGTERM, SIGUSR1 and a first SIGINT into a stop request; a second SIGINT exits at once."""

    def __init__(self, announce: bool):
        self.requested = False
        self.reason: str | None = None  # the first signal's name ("SIGINT", "SIGTERM", "SIGUSR1")
        self.interrupts = 0
        self.announce = announce

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (submitit's worker thread): STOP file only
                pass

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                sys.stderr.write("caldpo: second interrupt: exiting now (the last complete checkpoint is kept)\n")
                sys.stderr.flush()
                os._exit(130)
        self.requested = True
        self.reason = self.reason or signal.Signals(signum).name
        if self.announce:
            extra = " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""
            sys.stderr.write(f"caldpo: {signal.Signals(signum).name}: checkpointing at the next step "
                             f"boundary, then exiting{extra}\n")
            sys.stderr.flush()


def request_stop(run_dir: Path | str) -> Path:
    """Create ``<run_dir>/STOP`` (and the directory); the run checkpoints at its next step boundary and exits."""
    stop = Path(run_dir) / STOP
    stop.parent.mkdir(parents=True, exist_ok=True)
    stop.touch()
    return stop


def stop_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / STOP).exists()


def clear_stop(run_dir: Path | str) -> None:
    (Path(run_dir) / STOP).unlink(missing_ok=True)


def write_done(run_dir: Path, summary: dict) -> None:
    """Write the run's summary to ``<run_dir>/DONE`` whole (``caldpo.files.write_output``): the run's last write."""
    fault_point("before_done")
    write_output(run_dir / DONE, json_text(summary, indent=2, default=float), "the finished run's summary")
    fault_point("after_done")


def read_done(run_dir: Path) -> dict | None:
    """The finished run's summary, or None when ``<run_dir>/DONE`` is absent. RunError naming the file and what
    to do when it is not the JSON object caldpo writes."""
    done = Path(run_dir) / DONE
    if not done.exists():
        return None
    try:
        summary = json.loads(done.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError(f"a JSON {type(summary).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise RunError(f"{done}: unreadable ({' '.join(str(e).split())[:200]}); it marks the run in {run_dir} as "
                       "finished. Restore it from a copy, or delete it: the rerun then resumes from the last "
                       "checkpoint and repeats the final evaluation and export") from None
    return summary
