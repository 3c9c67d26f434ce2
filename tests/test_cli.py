"""Every command-line entry point reports the same errors the same way (caldpo.cli owns the rule).

Each entry point's work is replaced by one that raises; the entry point must print one
``caldpo: ...`` line (the config/data prefixes included) and return the table's exit status.
"""
from __future__ import annotations

import pytest

from caldpo.train.config import ConfigError
from caldpo.train.data import DataError
from caldpo.train.rundir import RunError
from conftest import TINY

ERRORS = [  # (exception, first line printed, exit status)
    (ConfigError("lr=-1: must be > 0"), "caldpo: config error: lr=-1: must be > 0", 2),
    (DataError("train.jsonl", 3, "bad JSON"), "caldpo: data error: train.jsonl:3: bad JSON", 2),
    (RunError("metrics.jsonl: disk full", exit_code=3), "caldpo: metrics.jsonl: disk full", 3),
    (KeyboardInterrupt(), "caldpo: interrupted", 130),
]


def _raise(e):
    def fail(*args, **kw):
        raise e
    return fail


def _train(monkeypatch, tmp_path, fail):
    import caldpo.train.trainer as trainer
    from caldpo.train.__main__ import cli

    monkeypatch.setattr(trainer, "main", fail)
    return cli([*TINY, "loss=sft", f"run_dir={tmp_path / 'run'}"])


def _generate(monkeypatch, tmp_path, fail):
    import caldpo.train.generate as generate

    monkeypatch.setattr(generate, "main", fail)
    return generate.cli([])


def _preproc(monkeypatch, tmp_path, fail):
    import caldpo.train.preproc as preproc

    monkeypatch.setattr(preproc, "tldr_pref", fail)
    try:
        preproc.main(["tldr-pref", "--input", str(tmp_path), "--out", str(tmp_path / "out")])
    except SystemExit as e:
        return e.code
    return 0


def _eval(monkeypatch, tmp_path, fail):
    import caldpo.eval.__main__ as ev

    monkeypatch.setattr(ev, "main", fail)
    return ev.cli([])


def _plot(monkeypatch, tmp_path, fail):
    import caldpo.plot as plot

    monkeypatch.setattr(plot, "plot_runs", fail)
    return plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("entry", [_train, _generate, _preproc, _eval, _plot])
@pytest.mark.parametrize("error, line, status", ERRORS, ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else "")
def test_entry_points_report_errors_alike(entry, error, line, status, monkeypatch, tmp_path, capsys):
    assert entry(monkeypatch, tmp_path, _raise(error)) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


def test_unexpected_errors_keep_their_traceback():
    from caldpo.cli import run

    with pytest.raises(ZeroDivisionError):
        run(lambda: 1 / 0)
    assert run(lambda: None) == 0 and run(lambda: 1) == 1


def test_run_stopped_on_request_exits_75_with_one_line(tmp_path):
    """A STOP file present at the start: one step, a resume checkpoint, exit 75 (not 0: no LATEST yet)."""
    from conftest import run_train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    proc = run_train([*TINY, "loss=sft", "n_examples=16", "batch_size=8", "export_hf=false", f"run_dir={run_dir}"],
                     check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    line = (f"caldpo: stopped at step 1 (the STOP file); a resume checkpoint is in {run_dir}; "
            "rerun the same command to resume")
    assert proc.stderr.splitlines()[-1] == line
    assert (run_dir / "checkpoints" / "step_1").is_dir() and not (run_dir / "LATEST").exists()


@pytest.mark.parametrize("stopped_by, status", [("SIGINT", 130), ("SIGTERM", 75), ("SIGUSR1", 75), (None, 75)])
def test_stop_reasons_exit_statuses(stopped_by, status):
    from caldpo.cli import stopped_status

    result = {"stopped": True, "step": 4, "run_dir": "/r", **({"stopped_by": stopped_by} if stopped_by else {})}
    line, code = stopped_status(result)
    assert code == status and line.startswith(f"caldpo: stopped at step 4 ({stopped_by or 'the STOP file'}); ")
