"""Named kill points for fault-injection tests: ``CALDPO_FAULT=<name>[:<step>]``.

``fault_point(name, step)`` SIGKILLs the calling process (no cleanup, no atexit, exactly
like ``kill -9`` or a node failure) when the environment variable ``CALDPO_FAULT`` names
this point, and, if the variable gives a step, when ``step`` equals it. Unset (the normal
case) it costs one dictionary lookup made once at import. ``CALDPO_FAULT_RANK`` restricts
the kill to one rank under torchrun (default: every rank that reaches the point).

Points (see tests/test_faults.py): ``data_load``, ``mid_step``, ``save_dcp_written``,
``save_before_marker``, ``save_before_rename``, ``resave_aside``, ``resave_before_delete``,
``policy_tmp``, ``hf_export``, ``before_done``, ``after_done``.
"""
from __future__ import annotations

import os
import signal
import sys

_SPEC = os.environ.get("CALDPO_FAULT", "")
_NAME, _, _STEP = _SPEC.partition(":")
_RANK = os.environ.get("CALDPO_FAULT_RANK")


def fault_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process if ``CALDPO_FAULT`` selects ``name`` (and ``step``, when it gives one)."""
    if not _NAME or name != _NAME:
        return
    if _STEP and (step is None or int(_STEP) != int(step)):
        return
    if _RANK is not None and os.environ.get("RANK", "0") != _RANK:
        return
    sys.stderr.write(f"caldpo: fault injection: SIGKILL at {name}{'' if step is None else f':{step}'}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
