"""The one owner of how caldpo's command-line entry points report errors and exit.

Every ``python -m caldpo...`` entry point runs its work through :func:`run`. An expected
error becomes one line on stderr and an exit status; anything else keeps its traceback.

==========================================  =========================================  ======
exception                                   line printed                               status
==========================================  =========================================  ======
``caldpo.train.config.ConfigError``         ``caldpo: config error: <message>``        2
``caldpo.train.data.DataError``             ``caldpo: data error: <message>``          2
``caldpo.train.rundir.RunError``,           ``caldpo: <message>``                      its ``exit_code``
``caldpo.train.checkpoint.CheckpointError``                                            (default 2)
``caldpo.files.OutputError``                ``caldpo: <message>``                      its ``exit_code``
                                                                                       (2: found before
                                                                                       the work, 3: the
                                                                                       write failed)
the entry point's own ``errors``             ``caldpo: <message>``                      its ``exit_code``
(``EvalError``, ``JudgeError``,                                                        (default 2)
``PlotError``)
``KeyboardInterrupt``                       ``caldpo: <interrupted>``                  130
==========================================  =========================================  ======

A training run that stopped on request before finishing is not an error, but not a success
either: :func:`stopped_status` gives its line and status (130 after Ctrl-C, 75 otherwise).

The training classes are looked up among the modules already imported (an exception of a class
whose module was never imported cannot have been raised), so this module imports nothing heavy.
An entry point run as ``python -m`` is the module ``__main__``, so the classes it defines itself
are passed as ``errors``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

# (module, class name, prefix of the printed message); the first match wins, subclasses included.
ERRORS: tuple[tuple[str, str, str], ...] = (
    ("caldpo.train.config", "ConfigError", "config error: "),
    ("caldpo.train.data", "DataError", "data error: "),
    ("caldpo.train.rundir", "RunError", ""),
    ("caldpo.train.checkpoint", "CheckpointError", ""),
    ("caldpo.files", "OutputError", ""),
)
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
STOPPED = 75  # EX_TEMPFAIL (sysexits.h): a run stopped on request (STOP file, SIGTERM, SIGUSR1); rerun to resume


def stopped_status(result: dict) -> tuple[str, int]:
    """``(line, exit status)`` for a training run that stopped before finishing (the trainer's summary
    ``{"stopped": True, "step", "run_dir", "stopped_by"}``; ``stopped_by`` missing counts as "STOP").

    Ctrl-C (SIGINT) exits 130 as an interrupted command does; any other stop request exits 75
    (EX_TEMPFAIL: try again). Never 0, so ``train sft && train dpo`` does not go on without
    ``LATEST/policy.pt``.
    """
    reason = result.get("stopped_by") or "STOP"
    shown = "the STOP file" if reason == "STOP" else reason
    line = (f"caldpo: stopped at step {result.get('step')} ({shown}); a resume checkpoint is in "
            f"{result.get('run_dir')}; rerun the same command to resume")
    return line, INTERRUPTED if reason == "SIGINT" else STOPPED


def error_line(e: BaseException, errors: tuple[type[BaseException], ...] = ()) -> tuple[str, int] | None:
    """``(line, exit status)`` for an expected error ``e`` (``errors``: more classes that are); None otherwise."""
    known = [(getattr(sys.modules.get(module), name, None), prefix) for module, name, prefix in ERRORS]
    for cls, prefix in [*known, *((c, "") for c in errors)]:
        if cls is not None and isinstance(e, cls):
            return f"caldpo: {prefix}{e}", int(getattr(e, "exit_code", 2))
    return None


def run(work: Callable[[], int | None], *, errors: tuple[type[BaseException], ...] = (),
        interrupted: str = "interrupted") -> int:
    """Call ``work()`` and return the process exit status: its own (None -> 0), or that of its error.

    An expected error (see the module's table; ``errors``: the entry point's own) is printed to stderr as one line. A Ctrl-C
    (KeyboardInterrupt) prints ``caldpo: <interrupted>`` and returns 130. Other exceptions
    propagate with their traceback.
    """
    try:
        status = work()
    except KeyboardInterrupt:
        print(f"caldpo: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        reported = error_line(e, errors)
        if reported is None:
            raise
        print(reported[0], file=sys.stderr)
        return reported[1]
    return 0 if status is None else int(status)


def main(work: Callable[[], int | None], **kw) -> None:
    """``sys.exit(run(work, **kw))``: the body of an entry point's ``if __name__ == "__main__"``."""
    sys.exit(run(work, **kw))
