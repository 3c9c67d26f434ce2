"""Fused output-head log-probs and preference losses.

Public API (stable): `linear_logprobs`, `sequence_logprobs`, `preference_loss`,
`available_backends`, `resolve_backend`, `KernelOptions`. Backends: "reference"
(materialised logits), "torch" (token-chunked, exact), "native" (C++ extension, the
CPU default when it builds), "triton" (fused kernels, the CUDA default); "auto" picks
per device. `KernelOptions` holds every kernel setting (backend, block budget, forms)
and is passed as `options=`.
"""
from .backends import available_backends, resolve_backend
from .logprobs import linear_logprobs, sequence_logprobs
from .losses import LOSSES, preference_loss
from .options import KernelOptions

__all__ = [
    "LOSSES",
    "KernelOptions",
    "available_backends",
    "linear_logprobs",
    "preference_loss",
    "resolve_backend",
    "sequence_logprobs",
]
