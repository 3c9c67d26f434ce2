"""Backend names and the policy that picks one for a device.

Kept apart from the kernels so that importing `caldpo.kernels` never imports
Triton: the interpreter mode (`TRITON_INTERPRET=1`) must be set before the
first Triton import, and CPU-only installs may lack Triton altogether.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "torch", "triton", "native")


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


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map a requested backend ("auto" included) to a concrete one for `device`.

    "auto" is Triton on CUDA when Triton imports, otherwise the chunked torch
    path. "native" (3-14% faster than "torch" on CPU, measured in
    benchmarks/results/native_*.txt) is explicit only: choosing it would make the
    first CPU call on a machine compile C++. An explicit request that cannot run
    raises instead of silently falling back.
    """
    dev = torch.device(device)
    if backend == "auto":
        return "triton" if dev.type == "cuda" and triton_importable() else "torch"
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
