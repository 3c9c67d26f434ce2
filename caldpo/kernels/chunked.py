"""Torch backend: chunked log-probs that never hold more than one logits chunk.

Both functions work on *compacted* inputs (no ignored targets). Forward keeps
only the per-token logsumexp; backward recomputes each chunk's softmax and
applies d = g * (onehot - softmax) to W and X. In fp32 (the CPU rule) d is not
formed: the onehot part becomes a row gather/scatter, the softmax part one GEMM
per gradient, and the only pass over a chunk buffer besides the GEMMs is an
in-place exp (the -lse shift rides in the GEMM's beta term, and X is pre-scaled
by -g so that the weight-gradient block needs no negation pass). The 16-bit
rule forms d, rounded once (below).

Two chunking axes, picked by which gradient must be accumulated across chunks:
- over the vocabulary (when tokens <= vocab, the usual case): chunks are
  [M, Cv] column blocks; grad_weight rows are written once per block and only
  the smaller grad_hidden [M, H] accumulates (inside the GEMM, beta=1); the
  forward merges per-block logsumexps and picks each target logit out of the
  block that holds it. A 16-bit weight is cast to fp32 one block at a time
  into a reused buffer, never as a whole.
- over tokens (when tokens > vocab): chunks are [C, V] row blocks and
  grad_weight [V, H] accumulates; a 16-bit weight is cast to fp32 once.
Either way the accumulator is fp32 and logits are never rounded to 16 bits.

GEMM precision for 16-bit inputs (`KernelOptions.gemm`): on CPU the operands are cast to
fp32 one chunk at a time (its 16-bit GEMMs are slow) and all chunk buffers are
allocated once per call and reused (ragged last chunks use a contiguous prefix
of the same storage). On CUDA the GEMMs run in the input dtype on the tensor
cores with fp32 results (`torch.mm(..., out_dtype=torch.float32)`): logits and
their logsumexp stay fp32, and the backward forms each block of
d = g * (onehot - softmax) in fp32 and rounds it to the input dtype once, as the
operand of the two gradient GEMMs (d @ W, d^T @ X), the same numerics as the
fused Triton kernel. Over the vocabulary a grad_weight block is final after its
GEMM and is stored in the weight's dtype, so no [V, H] fp32 buffer exists.
Chunks are larger on CUDA (`options.CUDA_BLOCK_BYTES`) so that each GEMM is big enough
to hide the launches of the elementwise passes between them.
"""
from __future__ import annotations

import warnings

import torch

from .head import PLAIN, Head, chain_, transform_
from .options import KernelOptions
from .options import get as get_options

# Block budgets, the smallest block edge, the chunking axis and the 16-bit GEMM rule are
# settings: caldpo.kernels.options.KernelOptions (block_bytes, min_block, axis, gemm), passed
# as `options=` to forward / backward. The torch backend's CPU blocks were measured with
# benchmarks/bench_logprob_loss.py-shaped steps on a shared 2-core Xeon: from 0.5 to 32 MiB
# they timed within a few percent of each other on a quiet machine (V 8-16k), but at V = 50304
# 1 MiB blocks (~200 per call, each a dozen parallel regions) ran 4x slower than 8-32 MiB
# ones once other processes shared the cores (benchmarks/results/cpu_20261130_*).
# On CUDA, chunk widths are a multiple of this (see chunk_size).
CUDA_ALIGN = 128
# On CUDA the 16-bit GEMM forms pad the token count to a multiple of this (zero rows).
ROW_ALIGN = 16
# The fp32-output GEMM forms this torch's CUDA build supports (cleared on first failure).
_CUDA_FORMS = {"mm": True, "mm_out": True, "addmm_out": True}
# Rows per block when finishing grad_hidden / the target-row gathers (bounds temporaries).
ROW_BLOCK = 512


def chunk_size(rows: int, width: int, chunk_bytes: int | None = None, cuda: bool = False,
               options: KernelOptions | None = None) -> int:
    """How many of `rows` fit one chunk when each is `width` fp32 values wide: the options'
    block budget (`chunk_bytes` overrides it) over the row size, at least `min_block`.

    On CUDA the count is a multiple of CUDA_ALIGN: a chunk's row count becomes the
    leading dimension of the next GEMM's operand, and cuBLAS's tensor-core kernels
    need 16-byte aligned rows (on an H100, widths that were not a multiple of 8
    ran 2.6-2.9x slower; benchmarks/results/h100_20261128/NOTES.md).
    """
    opts = get_options(options)
    budget = chunk_bytes if chunk_bytes else opts.budget(cuda)
    size = max(opts.min_block, budget // (4 * max(width, 1)))
    if cuda and size >= CUDA_ALIGN:
        size -= size % CUDA_ALIGN
    return max(1, min(rows, size))


def _axis(m: int, v: int, opts: KernelOptions) -> str:
    if opts.axis != "auto":
        return opts.axis
    return "vocab" if m <= v else "tokens"


def _lowp(x: torch.Tensor, gemm: str) -> bool:
    """Whether GEMMs on this 16-bit tensor run in its own dtype (fp32 results) under `gemm`."""
    rule = gemm
    if x.dtype == torch.float32:
        return False
    return x.is_cuda if rule == "auto" else rule == "input"


def mm32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
         accumulate: bool = False) -> torch.Tensor:
    """a @ b in fp32 from 16-bit operands, products accumulated in fp32; written into
    `out` when given (added to it when `accumulate`), which is returned.

    On CUDA this is cuBLAS with fp32 output (`mm`/`addmm` with out_dtype; the
    accumulation rides in the GEMM's beta). Where this torch lacks a form, the next
    simpler one is used (with one warning). On CPU (tests of the CUDA rule) the
    operands are upcast: a product of two 16-bit values is exact in fp32, so only
    the summation order differs.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:  # fp32 blocks (heads with a bias, scale or cap)
        if out is None:
            return torch.mm(a, b)
        return torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    form = ("addmm_out" if accumulate else "mm_out") if out is not None else "mm"
    if a.is_cuda and _CUDA_FORMS[form]:
        try:
            if form == "addmm_out":
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            if form == "mm_out":
                return torch.mm(a, b, out_dtype=torch.float32, out=out)
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError) as e:
            _CUDA_FORMS[form] = False
            warnings.warn(f"16-bit GEMM with fp32 output, form {form!r}, is unavailable in this torch "
                          f"({str(e)[:200]}); using a slower form", RuntimeWarning)
    if out is None:
        return mm32(a, b) if a.is_cuda and _CUDA_FORMS["mm"] else torch.mm(a.float(), b.float())
    r = mm32(a, b)
    return out.add_(r) if accumulate else out.copy_(r)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view on the front of `buf` (ragged chunks stay contiguous)."""
    return buf.view(-1)[: rows * cols].view(rows, cols)


def _wrows(w: torch.Tensor, s: int, e: int, wbuf: torch.Tensor | None) -> torch.Tensor:
    """fp32 rows s:e of the weight: a view when already fp32, else cast into `wbuf`."""
    if wbuf is None:
        return w[s:e]
    out = _view(wbuf, e - s, w.shape[1])
    out.copy_(w[s:e])
    return out


def _block_lse(x: torch.Tensor) -> torch.Tensor:
    """Row logsumexp of a logits block, overwriting the block."""
    mx = x.amax(dim=1)
    x.sub_(mx.unsqueeze(1)).exp_()
    return x.sum(dim=1).log_().add_(mx)


def _opts(options: KernelOptions | None, chunk_bytes: int | None) -> KernelOptions:
    """The options, with `chunk_bytes` (the older keyword) as their block budget when given."""
    opts = get_options(options)
    return opts.replace(block_bytes=int(chunk_bytes)) if chunk_bytes else opts


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            chunk_bytes: int | None = None, head: Head = PLAIN, options: KernelOptions | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of target, logsumexp) per token, both [M] float32, of the logits
    head(hidden @ weight.T) (`head`: bias, scale, soft-cap; caldpo.kernels.head).
    `options`: block budget, min_block, axis, gemm (KernelOptions; `chunk_bytes` overrides
    the budget)."""
    opts = _opts(options, chunk_bytes)
    m, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    if m == 0:
        e = torch.empty(0, dtype=torch.float32, device=dev)
        return e, e.clone()
    if _lowp(hidden, opts.gemm):
        return _forward_lowp(hidden, weight.to(hidden.dtype), targets, opts, head)
    h = _f32(hidden)
    if _axis(m, v, opts) == "vocab":
        cv = chunk_size(v, m, None, hidden.is_cuda, opts)
        buf = torch.empty(m * cv, dtype=torch.float32, device=dev)
        wbuf = None if weight.dtype == torch.float32 else torch.empty(
            cv * weight.shape[1], dtype=torch.float32, device=dev)
        tgt = torch.zeros(m, dtype=torch.float32, device=dev)
        lse = None
        for s in range(0, v, cv):
            e = min(s + cv, v)
            logits = torch.mm(h, _wrows(weight, s, e, wbuf).T, out=_view(buf, m, e - s))
            lse = _pick_lse(transform_(logits, head, s), targets - s, tgt, lse)
        return tgt.sub_(lse), lse
    w = _f32(weight)
    c = chunk_size(m, v, None, hidden.is_cuda, opts)
    buf = torch.empty(c * v, dtype=torch.float32, device=dev)
    logp = torch.empty(m, dtype=torch.float32, device=dev)
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    for s in range(0, m, c):
        e = min(s + c, m)
        logits = transform_(torch.mm(h[s:e], w.T, out=_view(buf, e - s, v)), head)
        tgt = logits.gather(1, targets[s:e].unsqueeze(1)).squeeze(1)
        lse[s:e] = _block_lse(logits)
        torch.sub(tgt, lse[s:e], out=logp[s:e])
    return logp, lse


def _pick_lse(logits: torch.Tensor, rel: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor | None
              ) -> torch.Tensor:
    """Adds each row's target logit when it lies in this block (`rel` = target - block start)
    to `tgt`; returns the running logsumexp merged with this block's (the block is overwritten)."""
    cols = logits.shape[1]
    here = (rel >= 0) & (rel < cols)
    picked = logits.gather(1, rel.clamp(0, cols - 1).unsqueeze(1)).squeeze(1)
    tgt.add_(picked.masked_fill_(~here, 0.0))
    part = _block_lse(logits)
    return part if lse is None else torch.logaddexp(lse, part, out=lse)


def _forward_lowp(hidden, weight, targets, opts, head=PLAIN):
    """`forward` with 16-bit GEMMs into fp32 logits blocks (see the module doc); on CUDA
    the token count is padded to a multiple of ROW_ALIGN (zero rows, results dropped)."""
    m, v = hidden.shape[0], weight.shape[0]
    rows = aligned_rows(m)
    if hidden.is_cuda and rows != m:
        logp, lse = _forward_lowp(pad_rows(hidden, rows), weight, pad_rows(targets, rows), opts, head)
        return logp[:m], lse[:m]
    tgt = torch.zeros(m, dtype=torch.float32, device=hidden.device)
    lse = None
    if _axis(m, v, opts) == "vocab":
        cv = chunk_size(v, m, None, hidden.is_cuda, opts)
        for s in range(0, v, cv):
            lse = _pick_lse(transform_(mm32(hidden, weight[s:s + cv].T), head, s), targets - s, tgt, lse)
        return tgt.sub_(lse), lse
    c = chunk_size(m, v, None, hidden.is_cuda, opts)
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    for s in range(0, m, c):
        e = min(s + c, m)
        lse[s:e] = _pick_lse(transform_(mm32(hidden[s:e], weight.T), head), targets[s:e], tgt[s:e], None)
    return tgt.sub_(lse), lse


def _dlogits_block(x, w, shift, g, targets, col0, dtype, head=PLAIN):
    """d = g * (onehot - exp(l + shift)) * dl/dz for the vocab block that starts at column
    `col0`, where z = x @ w.T and l = head(z) (dl/dz = 1 without bias, scale or cap), formed in
    fp32 and rounded to `dtype` once (shift: minus the logsumexp; a target outside the block
    adds no onehot)."""
    logits = transform_(mm32(x, w.T), head, col0)
    # The soft-cap's derivative needs the logits after the softmax is formed: keep them then.
    z = torch.add(logits, shift).exp_().neg_() if head.softcap is not None else logits.add_(shift).exp_().neg_()
    cols = z.shape[1]
    rel = targets - col0
    here = ((rel >= 0) & (rel < cols)).to(z.dtype).unsqueeze(1)
    z.scatter_add_(1, rel.clamp(0, cols - 1).unsqueeze(1), here)
    return chain_(z.mul_(g), logits, head).to(dtype)


def aligned_rows(m: int) -> int:
    """m rounded up to a multiple of ROW_ALIGN."""
    return m + (-m) % ROW_ALIGN


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows`."""
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))]) if rows > x.shape[0] else x


def _backward_lowp(g, hidden, weight, targets, lse, need_hidden, need_weight, opts, block_fn,
                   grad_weight_dtype, head=PLAIN, need_bias=False):
    """`backward` with 16-bit GEMMs, and the form every backward with a non-plain head takes
    (fp32 inputs then give fp32 blocks). Each block of d = g * (onehot - softmax) * dl/dz is
    formed in fp32 and rounded to the input dtype once; then grad_hidden += d @ W_block and
    grad_weight[block] = d^T @ X, both GEMMs with fp32 results, and grad_bias[block] = the
    column sums of d (in fp32). Returns (grad_hidden, grad_weight, grad_bias or None).

    Over the vocabulary each block of grad_weight is final after one GEMM, so it is written
    in `grad_weight_dtype` (through a block-sized fp32 buffer when that is 16-bit): no
    [V, H] fp32 buffer. On CUDA the token count is padded to a multiple of ROW_ALIGN with
    rows whose upstream gradient is 0 (so d is 0 there), keeping every GEMM edge aligned.
    """
    m, v = hidden.shape[0], weight.shape[0]
    rows = aligned_rows(m)
    if hidden.is_cuda and rows != m:
        gh, gw, gb = _backward_lowp(pad_rows(g, rows), pad_rows(hidden, rows), weight, pad_rows(targets, rows),
                                    pad_rows(lse, rows), need_hidden, need_weight, opts, block_fn,
                                    grad_weight_dtype, head, need_bias)
        return (gh[:m] if need_hidden else None), gw, gb
    dt, h = hidden.dtype, hidden.shape[1]
    shift = lse.neg().unsqueeze(1)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_h = grad_w = None
    grad_b = torch.zeros(v, **f32) if need_bias else None
    kw = {} if head.plain else {"head": head}  # block functions that predate heads take 7 arguments
    if _axis(m, v, opts) == "vocab":
        cv = chunk_size(v, m, None, hidden.is_cuda, opts)
        if need_hidden:
            grad_h = torch.zeros(m, h, **f32)
        if need_weight:
            grad_w = torch.empty(weight.shape, dtype=grad_weight_dtype, device=hidden.device)
            wbuf = None if grad_weight_dtype == torch.float32 else torch.empty(cv * h, **f32)
        for s in range(0, v, cv):
            e = min(s + cv, v)
            wc = weight[s:e]
            d = block_fn(hidden, wc, shift, g, targets, s, dt, **kw)
            if need_bias:
                torch.sum(d, dim=0, dtype=torch.float32, out=grad_b[s:e])
            if need_hidden:
                mm32(d, wc, out=grad_h, accumulate=True)
            if need_weight:
                if wbuf is None:
                    mm32(d.T, hidden, out=grad_w[s:e])
                else:
                    grad_w[s:e].copy_(mm32(d.T, hidden, out=_view(wbuf, e - s, h)))
        return grad_h, grad_w, grad_b
    c = chunk_size(m, v, None, hidden.is_cuda, opts)
    if need_hidden:
        grad_h = torch.empty(m, h, **f32)
    if need_weight:
        grad_w = torch.zeros(weight.shape, **f32)
    for s in range(0, m, c):
        e = min(s + c, m)
        d = block_fn(hidden[s:e], weight, shift[s:e], g[s:e], targets[s:e], 0, dt, **kw)
        if need_bias:
            grad_b.add_(d.sum(dim=0, dtype=torch.float32))
        if need_hidden:
            mm32(d, weight, out=grad_h[s:e])
        if need_weight:
            mm32(d.T, hidden[s:e], out=grad_w, accumulate=True)
    return grad_h, grad_w, grad_b


def _finish_grad_hidden(acc: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        g: torch.Tensor) -> torch.Tensor:
    """acc <- g * (W[targets] - acc), in row blocks so the gathered rows stay small."""
    for s in range(0, acc.shape[0], ROW_BLOCK):
        e = min(s + ROW_BLOCK, acc.shape[0])
        blk = acc[s:e]
        torch.sub(weight.index_select(0, targets[s:e]), blk, out=blk).mul_(g[s:e])
    return acc


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool = True,
             need_weight: bool = True, chunk_bytes: int | None = None,
             dlogits_block=None, gemm: str | None = None, head: Head | None = None,
             need_bias: bool = False, options: KernelOptions | None = None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], in fp32 (in the
    16-bit GEMM rule, grad_weight may come in the weight's dtype; callers cast to it anyway).

    `options`: as in `forward`; `gemm` overrides the options' GEMM rule; `dlogits_block(x, w, shift, g, targets, col0, dtype)`
    replaces the torch ops that form g * (onehot - exp(x @ w.T + shift)) in the 16-bit
    rule (the Triton backend passes a one-pass kernel). With `head` given (the forward's),
    a third item follows: grad_bias [V] fp32 when `need_bias`, else None; a non-plain head
    takes the explicit-d form of `_backward_lowp` (its block function then gets `head=`).
    """
    opts = _opts(options, chunk_bytes)
    m, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    h = _f32(hidden)
    grad_h = grad_w = None
    extra = () if head is None else (None,)
    need_bias = need_bias and head is not None and head.bias is not None
    if m == 0 or not (need_hidden or need_weight or need_bias):
        if need_hidden:
            grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)
        if need_weight:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        if need_bias:
            extra = (torch.zeros(v, dtype=torch.float32, device=dev),)
        return (grad_h, grad_w) + extra
    g = _f32(grad).unsqueeze(1)
    block_fn = dlogits_block or _dlogits_block
    if _lowp(hidden, gemm or opts.gemm):
        out = _backward_lowp(g, hidden, weight.to(hidden.dtype), targets, lse, need_hidden, need_weight,
                             opts, block_fn, weight.dtype, head or PLAIN, need_bias)
        return out if head is not None else out[:2]
    if head is not None and not head.plain:
        # fp32 blocks (16-bit operands are upcast per GEMM by mm32 on CPU).
        return _backward_lowp(g, h, weight, targets, lse, need_hidden, need_weight, opts,
                              block_fn, torch.float32, head, need_bias)
    neg_lse = lse.neg().unsqueeze(1)
    ngx = h * g.neg() if need_weight else None  # rows of X scaled by minus their upstream grad

    if _axis(m, v, opts) == "vocab":
        cv = chunk_size(v, m, None, hidden.is_cuda, opts)
        buf = torch.empty(m * cv, dtype=torch.float32, device=dev)
        wbuf = None if weight.dtype == torch.float32 else torch.empty(
            cv * weight.shape[1], dtype=torch.float32, device=dev)
        acc = torch.zeros(m, h.shape[1], dtype=torch.float32, device=dev) if need_hidden else None
        if need_weight:
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=dev)
        for s in range(0, v, cv):
            e = min(s + cv, v)
            wc = _wrows(weight, s, e, wbuf)
            # softmax block = exp(X W^T - lse): the shift rides in the GEMM's beta term.
            p = torch.addmm(neg_lse, h, wc.T, out=_view(buf, m, e - s)).exp_()
            if need_hidden:
                acc.addmm_(p, wc)
            if need_weight:
                torch.mm(p.T, ngx, out=grad_w[s:e])
        if need_hidden:
            grad_h = _finish_grad_hidden(acc, weight, targets, g)
        if need_weight:
            grad_w.index_add_(0, targets, ngx, alpha=-1.0)
        return (grad_h, grad_w) + extra

    w = _f32(weight)
    c = chunk_size(m, v, None, hidden.is_cuda, opts)
    buf = torch.empty(c * v, dtype=torch.float32, device=dev)
    if need_hidden:
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=dev)
    if need_weight:
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
    for s in range(0, m, c):
        e = min(s + c, m)
        p = torch.addmm(neg_lse[s:e], h[s:e], w.T, out=_view(buf, e - s, v)).exp_()
        if need_hidden:
            gh = torch.mm(p, w, out=grad_h[s:e])
            torch.sub(w.index_select(0, targets[s:e]), gh, out=gh).mul_(g[s:e])
        if need_weight:
            grad_w.addmm_(p.T, ngx[s:e])
    if need_weight:
        grad_w.index_add_(0, targets, ngx, alpha=-1.0)
    return (grad_h, grad_w) + extra
