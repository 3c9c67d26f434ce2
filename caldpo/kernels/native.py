"""Native CPU backend: csrc/caldpo_native.cpp, built on first use.

Same contract as `chunked.forward` / `chunked.backward` on compacted inputs
(no ignored targets), CPU tensors only. Per logits block the C++ code runs one
BLAS GEMM and one fused OpenMP pass (max/exp/sum and the target pick forward;
exp * -g plus g at the target backward), then the two gradient GEMMs.

The extension is compiled by `torch.utils.cpp_extension.load` the first time
`available()`, `forward` or `backward` is called, into
`$CALDPO_CACHE/ext/<key>` (default `~/.cache/caldpo/ext/<key>`), where the key
names the torch version, the Python ABI, the machine and a hash of the source
and flags, so a cached build is reused only when it matches. An exclusive
`flock` serialises concurrent builds across processes (released by the kernel
if a builder dies). Importing this module never builds or raises: a missing
compiler or ninja, or a failed build, makes `available()` False and
`unavailable_reason()` says why.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading

import torch

from .head import PLAIN, Head

NAME = "caldpo_native"
SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "csrc", "caldpo_native.cpp")
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module = None
_reason: str | None = None  # set once a build attempt failed


def cache_dir() -> str:
    """Build directory for this source, torch, Python ABI and machine."""
    root = os.environ.get("CALDPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "caldpo")
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        digest.update(f.read())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    key = f"{torch.__version__}-{abi}-{platform.machine()}-{digest.hexdigest()[:16]}"
    return os.path.join(root, "ext", key.replace("+", "_").replace(os.sep, "_"))


def _missing_tools() -> str | None:
    if not os.path.isfile(SOURCE):
        return f"source not found: {SOURCE}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build():
    import fcntl

    from torch.utils.cpp_extension import load

    build_dir = cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "caldpo.flock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # a second process waits here, then loads the finished build
        try:
            return load(name=NAME, sources=[SOURCE], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                        build_directory=build_dir, verbose=os.environ.get("CALDPO_NATIVE_VERBOSE") == "1")
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)


def _get():
    """The compiled module, or None (with `_reason` set) when it cannot be built."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _module
    with _lock:
        if _module is None and _reason is None:
            if os.environ.get("CALDPO_NATIVE_DISABLE") == "1":
                _reason = "disabled by CALDPO_NATIVE_DISABLE=1"
            elif platform.system() != "Linux":
                _reason = f"only built on Linux (this is {platform.system()})"
            else:
                _reason = _missing_tools()
            if _reason is None:
                try:
                    _module = _build()
                except Exception as e:  # compiler errors, missing headers, broken toolchains
                    msg = str(e).strip().splitlines()
                    _reason = f"build failed: {type(e).__name__}: {msg[-1] if msg else ''}"
    return _module


def available() -> bool:
    """True when the extension is built (building it now if needed)."""
    return _get() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False; None when it is available."""
    return None if _get() is not None else _reason


def _require():
    mod = _get()
    if mod is None:
        raise RuntimeError(f"caldpo native backend unavailable: {_reason}")
    return mod


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            chunk_bytes: int | None = None, head: Head = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of target, logsumexp) per token, both [M] float32, of the logits
    head(hidden @ weight.T) (caldpo.kernels.head)."""
    logp, lse = _require().forward(hidden, weight, targets, int(chunk_bytes or 0), head.bias,
                                   float(head.scale), float(head.softcap or 0.0))
    return logp, lse


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool = True,
             need_weight: bool = True, chunk_bytes: int | None = None, head: Head | None = None,
             need_bias: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], in fp32 (None if unneeded);
    with `head` given, a third item: grad_bias [V] fp32 when `need_bias` (else None)."""
    hd = head or PLAIN
    need_bias = bool(need_bias) and hd.bias is not None
    gh, gw, gb = _require().backward(grad, hidden, weight, targets, lse, bool(need_hidden),
                                     bool(need_weight), int(chunk_bytes or 0), hd.bias, float(hd.scale),
                                     float(hd.softcap or 0.0), need_bias)
    out = (gh if need_hidden else None), (gw if need_weight else None)
    return out if head is None else out + ((gb if need_bias else None),)
