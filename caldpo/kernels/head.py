"""What an output head does to the raw logits, beyond ``hidden @ weight.T``.

Supported heads compute ``logits = softcap(scale * (hidden @ weight.T + bias))`` with
``softcap(y) = cap * tanh(y / cap)`` when a cap is set (Gemma-2/3's
``final_logit_softcapping``) and the identity otherwise; ``bias`` is the head's
``nn.Linear`` bias (Phi, GPT-J) and ``scale`` a constant factor (Cohere's
``logit_scale``, Granite's ``1 / logits_scaling``). Every backend applies the same
transform to each fp32 logits block before the logsumexp, and multiplies the logit
gradient by its derivative ``scale * (1 - tanh^2(y / cap)) = scale * (1 - (logits / cap)^2)``
(computed from the transformed logits, so backward never keeps the raw ones).

`Head` travels inside the kernels (backends' forward/backward); the public functions take
the three values as keyword arguments. Which head a Hugging Face model has is decided in
``caldpo.train.model.output_head``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Head(NamedTuple):
    """bias [V] (any float dtype) or None, scale (finite, non-zero), softcap (> 0) or None."""

    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        """True when the logits are exactly hidden @ weight.T."""
        return self.bias is None and self.scale == 1.0 and self.softcap is None


PLAIN = Head()


def make(bias: torch.Tensor | None, scale: float, softcap: float | None, vocab: int) -> Head:
    """A validated `Head`; raises ValueError naming the bad value."""
    scale = float(scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"scale={scale}: expected a finite non-zero factor")
    if softcap is not None:
        softcap = float(softcap)
        if not (math.isfinite(softcap) and softcap > 0.0):
            raise ValueError(f"softcap={softcap}: expected a finite cap > 0 (or None for no cap)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] with V={vocab}")
    return Head(bias, scale, softcap)


def transform_(z: torch.Tensor, head: Head, col0: int = 0) -> torch.Tensor:
    """Applies the head to an fp32 block of raw logits in place and returns it; the block's
    first column is vocabulary entry `col0`."""
    if head.bias is not None:
        z.add_(head.bias[col0:col0 + z.shape[1]])
    if head.scale != 1.0:
        z.mul_(head.scale)
    if head.softcap is not None:
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    return z


def chain_(d: torch.Tensor, logits: torch.Tensor, head: Head) -> torch.Tensor:
    """d <- d * dlogits/draw, in place (d: the gradient w.r.t. the transformed `logits`)."""
    if head.softcap is not None:
        d.mul_(1.0 - (logits / head.softcap).square_())
    if head.scale != 1.0:
        d.mul_(head.scale)
    return d


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, head: Head,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The head's full logits [N, V] in `dtype`, differentiable (for the reference backend)."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if head.bias is not None:
        z = z + head.bias.to(dtype)
    if head.scale != 1.0:
        z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z
