"""Torch backend: token-chunked log-probs that never hold more than one logits chunk.

Both functions work on *compacted* inputs (no ignored targets). Forward keeps
only the per-token logsumexp; backward recomputes each chunk's logits, forms
d = g * (onehot - softmax) in place, and accumulates grad_hidden and grad_weight
in fp32. Inputs in bf16/fp16 are upcast to fp32 for the matmuls, so logits are
never rounded to 16 bits.
"""
from __future__ import annotations

import torch

# Bytes of fp32 logits per chunk. Tuned on a 2-core Xeon at H=256, V=8192
# (see the kernels report); a chunk should stay in the last-level cache.
CHUNK_BYTES = 2 << 20
MIN_CHUNK = 32


def chunk_tokens(num_tokens: int, vocab: int, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about `chunk_bytes`."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(num_tokens, max(MIN_CHUNK, budget // (4 * max(vocab, 1)))))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of target, logsumexp) per token, both [M] float32."""
    m, v = hidden.shape[0], weight.shape[0]
    w_t = _f32(weight).T
    logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    c = chunk_tokens(m, v, chunk_bytes)
    buf = torch.empty(c, v, dtype=torch.float32, device=hidden.device)
    for s in range(0, m, c):
        e = min(s + c, m)
        logits = torch.mm(_f32(hidden[s:e]), w_t, out=buf[: e - s])
        tgt = logits.gather(1, targets[s:e].unsqueeze(1)).squeeze(1)
        mx = logits.amax(dim=1)
        logits.sub_(mx.unsqueeze(1)).exp_()
        chunk_lse = logits.sum(dim=1).log_().add_(mx)
        lse[s:e] = chunk_lse
        torch.sub(tgt, chunk_lse, out=logp[s:e])
    return logp, lse


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool = True,
             need_weight: bool = True, chunk_bytes: int | None = None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], in fp32."""
    m, v = hidden.shape[0], weight.shape[0]
    w32 = _f32(weight)
    w_t = w32.T
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    if m == 0 or not (need_hidden or need_weight):
        return grad_h, grad_w
    grad = _f32(grad)
    c = chunk_tokens(m, v, chunk_bytes)
    buf = torch.empty(c, v, dtype=torch.float32, device=hidden.device)
    rows = torch.arange(c, device=hidden.device)
    for s in range(0, m, c):
        e = min(s + c, m)
        h = _f32(hidden[s:e])
        g = grad[s:e]
        d = torch.mm(h, w_t, out=buf[: e - s])
        d.sub_(lse[s:e].unsqueeze(1)).exp_().mul_(g.neg().unsqueeze(1))
        d.index_put_((rows[: e - s], targets[s:e]), g, accumulate=True)
        if need_hidden:
            torch.mm(d, w32, out=grad_h[s:e])
        if need_weight:
            grad_w.addmm_(d.T, h)
    return grad_h, grad_w
