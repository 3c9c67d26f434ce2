"""Named kill points for fault-injection tests: ``CALDPO_FAULT=<name>[:<step>]``.

``fault_point(name, step)`` SIGKILLs the calling process (no cleanup, no atexit, exactly
like ``kill -9`` or a node failure) when the environment variable ``CALDPO_FAULT`` names
this point, and, if the variable gives a step, when ``step`` equals it. Unset (the normal
case) a call costs one environment lookup. ``CALDPO_FAULT_RANK`` restricts the kill to one
rank under torch.distributed (default: every rank that reaches the point).
``CALDPO_FAULT_SIGNAL`` sends other signals instead, comma-separated and in order
(``INT`` is a Ctrl-C, ``INT,INT`` two of them), and the process carries on.

Points (see tests/test_faults.py): ``data_load``, ``mid_step`` (after backward, before the
optimizer step of step N), ``save_dcp_written``, ``save_before_marker``,
``save_before_rename``, ``resave_aside``, ``resave_before_delete`` (steps of a resume save),
``policy_tmp``, ``hf_export`` (inside the final export), ``eval_policy_tmp`` (inside an
evaluation's ``step-<examples>`` export), ``before_done``, ``after_done``.
"""
from __future__ import annotations

import os
import signal
import sys


def fault_point(name: str, step: int | None = None) -> None:
    """Signal this process if ``CALDPO_FAULT`` selects ``name`` (and ``step``, when it gives one)."""
    spec = os.environ.get("CALDPO_FAULT")
    if not spec:
        return
    point, _, at = spec.partition(":")
    if point != name or (at and (step is None or int(at) != int(step))):
        return
    rank = os.environ.get("CALDPO_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    sigs = os.environ.get("CALDPO_FAULT_SIGNAL", "KILL").split(",")
    sys.stderr.write(f"caldpo: fault injection: SIG{'+SIG'.join(sigs)} at {name}{'' if step is None else f':{step}'}\n")
    sys.stderr.flush()
    for sig in sigs:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig.strip().upper()}"))
