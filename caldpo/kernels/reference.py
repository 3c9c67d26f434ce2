"""Reference backend: materialise the full logits and let autograd differentiate.

The simplest correct path, used as a baseline in benchmarks and as a
debugging aid. It allocates [N, V] logits (in fp32, or fp64 when asked), so
it is only for small problems.
"""
from __future__ import annotations

import torch

from .head import PLAIN, Head, reference_logits


def reference_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
    head: Head = PLAIN,
) -> torch.Tensor:
    """log_softmax(head(hidden @ weight.T))[targets] in `dtype`, 0.0 at ignored targets -> [N] float32.

    `head` adds the output bias, scale and soft-cap (caldpo.kernels.head); targets are
    assumed in range (linear_logprobs checks them).
    """
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logits = reference_logits(hidden, weight, head, dtype)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, torch.zeros_like(logp)).float()
