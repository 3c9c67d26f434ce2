"""Native CPU backend: csrc/caldpo_native.cpp, built on first use.

Same contract as `chunked.forward` / `chunked.backward` on compacted inputs
(no ignored targets), CPU tensors only. Per logits block the C++ code runs one
BLAS GEMM and one fused OpenMP pass (max/exp/sum and the target pick forward;
exp * -g plus g at the target backward), then the two gradient GEMMs. Blocks are
`KernelOptions.block_bytes` of fp32 logits (16 MiB on CPU by default: at V = 50304 and
1024 tokens, 13 blocks), at least `min_block` columns wide. It is what backend "auto"
picks on CPU when it builds (caldpo.kernels.backends).

The extension is compiled by `torch.utils.cpp_extension.load` the first time
`available()`, `forward` or `backward` is called, into
`$CALDPO_CACHE/ext/<key>` (default `~/.cache/caldpo/ext/<key>`), where the key
names the torch version, the Python ABI, the machine and a hash of the source
and flags, so a cached build is reused only when it matches; a finished build is
imported directly (no compiler, ninja or rebuild check needed). An exclusive
`flock` serialises concurrent builds across processes (released by the kernel
if a builder dies). A build that actually runs prints one line on stderr (what it
builds, about how long, where it goes); a cached one prints nothing. Importing this
module never builds or raises: a missing
compiler or ninja with no cached build, or a failed build, makes `available()`
False and `unavailable_reason()` says why.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import threading

import torch

from .head import PLAIN, Head
from .options import KernelOptions
from .options import get as get_options

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


BUILT = "caldpo.built"  # written next to the library once a build has loaded


def _import_built(build_dir: str):
    """The finished build in `build_dir` (its marker present), imported without running ninja;
    None when there is none."""
    lib = os.path.join(build_dir, NAME + ".so")
    if not (os.path.isfile(lib) and os.path.isfile(os.path.join(build_dir, BUILT))):
        return None
    spec = importlib.util.spec_from_file_location(NAME, lib)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(build_dir: str):
    """Builds (or finds) the extension in `build_dir` under an exclusive file lock.

    A finished build (the key in `cache_dir` names the source, flags, torch and Python) is
    imported directly: ninja is not run again, so processes whose PATH finds different ninja
    versions (whose logs hash command lines differently, so each would rebuild after the
    other) share one build instead of compiling in turn.
    """
    import fcntl

    from torch.utils.cpp_extension import load

    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "caldpo.flock"), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # a second process waits here, then loads the finished build
        try:
            mod = _import_built(build_dir)
            if mod is not None:
                return mod
            reason = _missing_tools()
            if reason is not None:
                raise _Unavailable(reason)
            # the first use on a machine compiles for about half a minute: say so, once, where it happens
            print(f"caldpo: building the native CPU head (first use, ~30 s; cached in {build_dir})",
                  file=sys.stderr, flush=True)
            mod = load(name=NAME, sources=[SOURCE], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                       build_directory=build_dir, verbose=os.environ.get("CALDPO_NATIVE_VERBOSE") == "1")
            with open(os.path.join(build_dir, BUILT), "w") as f:
                f.write(f"{torch.__version__} {sys.version.split()[0]}\n")
            return mod
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)


class _Unavailable(Exception):
    """No build is cached and this machine cannot make one (the message says why)."""


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
            elif not os.path.isfile(SOURCE):
                _reason = f"source not found: {SOURCE}"
            if _reason is None:
                try:
                    _module = _build(cache_dir())
                except _Unavailable as e:
                    _reason = str(e)
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


def _tiling(options: KernelOptions | None, chunk_bytes: int | None) -> tuple[int, int]:
    """(block budget in bytes, narrowest vocabulary block) from the options (CPU budget);
    `chunk_bytes` (the older keyword) overrides the budget."""
    opts = get_options(options)
    return int(chunk_bytes or opts.budget(cuda=False)), int(opts.min_block)


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            chunk_bytes: int | None = None, head: Head = PLAIN, options: KernelOptions | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of target, logsumexp) per token, both [M] float32, of the logits
    head(hidden @ weight.T) (caldpo.kernels.head); blocks of `options.block_bytes` (CPU default)
    with at least `options.min_block` columns."""
    budget, min_cols = _tiling(options, chunk_bytes)
    logp, lse = _require().forward(hidden, weight, targets, budget, head.bias,
                                   float(head.scale), float(head.softcap or 0.0), min_cols)
    return logp, lse


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool = True,
             need_weight: bool = True, chunk_bytes: int | None = None, head: Head | None = None,
             need_bias: bool = False, options: KernelOptions | None = None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], in fp32 (None if unneeded);
    with `head` given, a third item: grad_bias [V] fp32 when `need_bias` (else None)."""
    hd = head or PLAIN
    need_bias = bool(need_bias) and hd.bias is not None
    budget, min_cols = _tiling(options, chunk_bytes)
    gh, gw, gb = _require().backward(grad, hidden, weight, targets, lse, bool(need_hidden),
                                     bool(need_weight), budget, hd.bias, float(hd.scale),
                                     float(hd.softcap or 0.0), need_bias, min_cols)
    out = (gh if need_hidden else None), (gw if need_weight else None)
    return out if head is None else out + ((gb if need_bias else None),)
