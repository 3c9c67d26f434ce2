"""The run directory's process protocol: the lock, stop signals, workers that follow their launcher."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caldpo.train.config import ConfigError, load_config, validate
from caldpo.train.rundir import RunError, RunLock

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def test_second_lock_is_refused_with_the_holders_pid(tmp_path):
    lock = RunLock(tmp_path / "run")
    with pytest.raises(RunError, match=f"in use by pid {os.getpid()} on "):
        RunLock(tmp_path / "run")
    lock.release()
    RunLock(tmp_path / "run").release()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    p = _python(f"from pathlib import Path; from caldpo.train.rundir import RunLock; "
                f"l = RunLock(Path({str(tmp_path)!r})); print('locked', flush=True); import time; time.sleep(60)")
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match=f"pid {p.pid}"):
        RunLock(tmp_path)
    p.kill()
    p.wait()
    RunLock(tmp_path).release()


def test_worker_exits_when_its_launcher_is_killed(tmp_path):
    """A launcher (standing in for torchrun's agent) starts a worker and is SIGKILLed; the worker follows."""
    worker = ("import time; from caldpo.train.rundir import exit_with_launcher; exit_with_launcher(0.05); "
              "print('ready', flush=True); time.sleep(60)")
    launcher = (f"import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', {worker!r}]); "
                "print(w.pid, flush=True); w.wait()")
    p = _python(launcher, env={"TORCHELASTIC_RUN_ID": "test"})
    worker_pid = int(p.stdout.readline())
    time.sleep(0.5)
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{worker_pid}/stat").read_text().split(") ")[1].startswith("Z"):
            break  # exited, not yet reaped by init
        time.sleep(0.05)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its launcher")


def test_first_interrupt_requests_a_stop_and_a_second_exits_at_once():
    code = ("import os, signal, time; from caldpo.train.rundir import StopSignals; s = StopSignals(True); "
            "s.install(); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.1); print('requested', s.requested, "
            "flush=True); os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('still running')")
    p = _python(code)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "requested True" in out and "still running" not in out
    assert "Ctrl-C again to exit at once" in err and "second interrupt" in err


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", ""])
def test_exp_name_must_be_a_name(name):
    with pytest.raises(ConfigError, match="exp_name"):
        validate(load_config([f"exp_name={name}", "device=cpu"]), 1)


def test_torchrun_workers_exit_when_torchrun_is_killed(tmp_path):
    """torchrun starts its workers in sessions of their own: killing torchrun's process group (kill -9 of the
    launcher, a lost agent) leaves them running unless they watch their parent."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "caldpo.train",
           "model=tiny", "datasets=[sample]", "loss=sft", "n_examples=400", "batch_size=4", "max_length=64",
           "max_prompt_length=32", "device=cpu", "trainer=FSDPTrainer", "do_first_eval=false", f"run_dir={run}"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or metrics.stat().st_size == 0) and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2
    os.killpg(os.getpgid(p.pid), signal.SIGKILL)
    p.wait()

    def alive(pid):
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and not stat.read_text().split(") ")[1].startswith("Z")

    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "torchrun workers outlived their launcher"
    assert "the launcher (pid" in p.stderr.read()
