"""Fused output-head log-probs and preference losses.

Public API (stable): `linear_logprobs`, `sequence_logprobs`, `preference_loss`,
`available_backends`, `resolve_backend`. Backends: "reference" (materialised
logits), "torch" (token-chunked, exact, the CPU default), "triton" (fused
kernels, the CUDA default); "auto" picks per device.
"""
from .backends import available_backends, resolve_backend
from .logprobs import linear_logprobs, sequence_logprobs
from .losses import LOSSES, preference_loss

__all__ = [
    "LOSSES",
    "available_backends",
    "linear_logprobs",
    "preference_loss",
    "resolve_backend",
    "sequence_logprobs",
]
