"""Backend names and the policy that picks one for a device.

Kept apart from the kernels so that importing `caldpo.kernels` never imports
Triton: the interpreter mode (`TRITON_INTERPRET=1`) must be set before the
first Triton import, and CPU-only installs may lack Triton altogether.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading

import torch

BACKENDS = ("reference", "torch", "triton", "native")

log = logging.getLogger("caldpo")
_fallback_logged = threading.Event()


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when the `triton` package can be imported (checked once)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # broken install: treat as absent
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on `device` (all devices when None).

    "triton" needs Triton and either a CUDA device or the CPU interpreter;
    "native" (the C++ extension in csrc/, CPU only) is listed when its build is
    already cached or succeeds now (the first build compiles for 30-60 s).
    """
    names = ["reference", "torch"]
    if triton_importable():
        dev = torch.device(device) if device is not None else None
        if dev is None or dev.type == "cuda" or triton_interpreting():
            names.append("triton")
    if device is not None and torch.device(device).type == "cpu":
        from . import native
        if native.available():
            names.append("native")
    return names


def _auto_cpu() -> str:
    """"native" when the C++ extension is built or builds now, else "torch", saying why once
    (on the "caldpo" logger, at WARNING)."""
    from . import native
    if native.available():
        return "native"
    if not _fallback_logged.is_set():
        _fallback_logged.set()
        log.warning("caldpo.kernels: backend 'auto' on CPU uses the chunked torch path, not the native "
                    "extension (%s); set CALDPO_NATIVE_DISABLE=1 to choose this without trying",
                    native.unavailable_reason())
    return "torch"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map a requested backend ("auto" included) to a concrete one for `device`.

    "auto" is Triton on CUDA when Triton imports. On CPU it is "native" (csrc/, the
    fastest CPU path, and the one that stays fast when other processes share the
    cores: benchmarks/README.md, CPU section) when the extension is cached or builds
    now (the first call on a machine compiles it, 30-60 s, under a file lock), and
    the chunked torch path otherwise (no compiler or ninja, a failed build, or
    CALDPO_NATIVE_DISABLE=1), which is logged once with the reason. An explicit
    request that cannot run raises instead of silently falling back.
    """
    dev = torch.device(device)
    if backend == "auto":
        if dev.type == "cuda":
            return "triton" if triton_importable() else "torch"
        return _auto_cpu() if dev.type == "cpu" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend == "triton" and backend not in available_backends(dev):
        raise RuntimeError(
            "backend='triton' needs Triton and a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before Triton is imported, for CPU tensors)"
        )
    if backend == "native":
        from . import native
        if dev.type != "cpu":
            raise RuntimeError("backend='native' runs on CPU tensors only")
        if not native.available():
            raise RuntimeError(f"backend='native' unavailable: {native.unavailable_reason()}")
    return backend
