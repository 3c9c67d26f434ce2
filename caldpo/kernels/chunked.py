"""Torch backend: chunked log-probs that never hold more than one logits chunk.

Both functions work on *compacted* inputs (no ignored targets). Forward keeps
only the per-token logsumexp; backward recomputes each chunk's softmax and
applies d = g * (onehot - softmax) to W and X without forming d: the onehot
part becomes a row gather/scatter, the softmax part one GEMM per gradient, and
the only pass over a chunk buffer besides the GEMMs is an in-place exp.

Two chunking axes, picked by which gradient must be accumulated across chunks:
- over the vocabulary (when tokens <= vocab, the usual case): chunks are
  [M, Cv] column blocks; grad_weight rows are written once per block and only
  the smaller grad_hidden [M, H] accumulates (inside the GEMM, beta=1); the
  forward merges per-block logsumexps.
- over tokens (when tokens > vocab): chunks are [C, V] row blocks and
  grad_weight [V, H] accumulates.
Either way the accumulator is fp32 and bf16/fp16 inputs are upcast to fp32 for
the GEMMs, so logits are never rounded to 16 bits.
"""
from __future__ import annotations

import torch

# Bytes of fp32 logits per chunk, and the smallest chunk edge (GEMM efficiency).
# On a shared 2-core Xeon at N=2048, H=256, V=8192, budgets of 1-8 MiB timed
# within run-to-run noise of each other; 2 MiB keeps a block cache-resident.
CHUNK_BYTES = 2 << 20
MIN_CHUNK = 128
# "auto" chooses by shape; tests force each axis.
AXIS = "auto"


def chunk_size(rows: int, width: int, chunk_bytes: int | None = None) -> int:
    """How many of `rows` fit one chunk when each is `width` fp32 values wide."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(rows, max(MIN_CHUNK, budget // (4 * max(width, 1)))))


def _axis(m: int, v: int) -> str:
    if AXIS != "auto":
        return AXIS
    return "vocab" if m <= v else "tokens"


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _block_lse(x: torch.Tensor) -> torch.Tensor:
    """Row logsumexp of a logits block, overwriting the block."""
    mx = x.amax(dim=1)
    x.sub_(mx.unsqueeze(1)).exp_()
    return x.sum(dim=1).log_().add_(mx)


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of target, logsumexp) per token, both [M] float32."""
    m, v = hidden.shape[0], weight.shape[0]
    h, w = _f32(hidden), _f32(weight)
    dev = hidden.device
    if m == 0:
        e = torch.empty(0, dtype=torch.float32, device=dev)
        return e, e.clone()
    if _axis(m, v) == "vocab":
        cv = chunk_size(v, m, chunk_bytes)
        buf = torch.empty(m, cv, dtype=torch.float32, device=dev)
        lse = None
        for s in range(0, v, cv):
            e = min(s + cv, v)
            part = _block_lse(torch.mm(h, w[s:e].T, out=buf[:, : e - s]))
            lse = part if lse is None else torch.logaddexp(lse, part, out=lse)
        target_logit = (h * w.index_select(0, targets)).sum(dim=1)
        return target_logit - lse, lse
    c = chunk_size(m, v, chunk_bytes)
    buf = torch.empty(c, v, dtype=torch.float32, device=dev)
    logp = torch.empty(m, dtype=torch.float32, device=dev)
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    for s in range(0, m, c):
        e = min(s + c, m)
        logits = torch.mm(h[s:e], w.T, out=buf[: e - s])
        tgt = logits.gather(1, targets[s:e].unsqueeze(1)).squeeze(1)
        lse[s:e] = _block_lse(logits)
        torch.sub(tgt, lse[s:e], out=logp[s:e])
    return logp, lse


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool = True,
             need_weight: bool = True, chunk_bytes: int | None = None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], in fp32."""
    m, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    h, w = _f32(hidden), _f32(weight)
    grad_h = grad_w = None
    if m == 0 or not (need_hidden or need_weight):
        if need_hidden:
            grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)
        if need_weight:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        return grad_h, grad_w
    g = _f32(grad).unsqueeze(1)
    neg_lse = lse.neg().unsqueeze(1)
    gx = h * g if need_weight else None  # rows of X scaled by their upstream grad

    if _axis(m, v) == "vocab":
        cv = chunk_size(v, m, chunk_bytes)
        buf = torch.empty(m, cv, dtype=torch.float32, device=dev)
        acc = torch.zeros(m, h.shape[1], dtype=torch.float32, device=dev) if need_hidden else None
        if need_weight:
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=dev)
        for s in range(0, v, cv):
            e = min(s + cv, v)
            # softmax block = exp(X W^T - lse): the shift rides in the GEMM's beta term.
            p = torch.addmm(neg_lse, h, w[s:e].T, out=buf[:, : e - s]).exp_()
            if need_hidden:
                acc.addmm_(p, w[s:e])
            if need_weight:
                torch.mm(p.T, gx, out=grad_w[s:e]).neg_()
        if need_hidden:
            grad_h = torch.sub(w.index_select(0, targets), acc, out=acc).mul_(g)
        if need_weight:
            grad_w.index_add_(0, targets, gx)
        return grad_h, grad_w

    c = chunk_size(m, v, chunk_bytes)
    buf = torch.empty(c, v, dtype=torch.float32, device=dev)
    if need_hidden:
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=dev)
    if need_weight:
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
    for s in range(0, m, c):
        e = min(s + c, m)
        p = torch.addmm(neg_lse[s:e], h[s:e], w.T, out=buf[: e - s]).exp_()
        if need_hidden:
            gh = torch.mm(p, w, out=grad_h[s:e])
            torch.sub(w.index_select(0, targets[s:e]), gh, out=gh).mul_(g[s:e])
        if need_weight:
            grad_w.addmm_(p.T, gx[s:e], alpha=-1.0)
    if need_weight:
        grad_w.index_add_(0, targets, gx)
    return grad_h, grad_w
