"""Triton backend: the output head's log-softmax at the targets, forward and backward.

Both entry points take *compacted* inputs (ignored tokens already removed). Each
step has two forms; `KernelOptions.forward_form` / `backward_form` pick them for 16-bit inputs (fp32
inputs always take the fused kernels, with IEEE fp32 products, no TF32).

Forward, "fused" (default; `_fwd_kernel`, grid = token tiles x vocab splits):
each program multiplies a [BLOCK_M, H] hidden tile by [BLOCK_V, H] weight tiles
of its vocab split, keeps an online (max, sum-exp) per row and picks the target
logit in the same pass. Splitting the vocab gives enough programs when tokens
are few; the per-split (max, sum) pairs are merged with one small torch
logsumexp. Only the logsumexp per token [M] is saved for backward. Tiles are
autotuned on CUDA (keyed on V, H and dtypes; an H100 picked 128 x 256 x 64).
Forward, "gemm": cuBLAS GEMMs into fp32 [M, Cv] vocab blocks, each reduced by
one Triton pass (`_lse_block_kernel`).

Backward, "gemm" (default): per vocab block of Cv columns (the chunked backend's
`_backward_lowp`), recompute the logits with a cuBLAS GEMM into fp32, form
d = g * (onehot - exp(logits - lse)) rounded to the input dtype in one Triton
pass (`_dlogits_block_kernel`), then grad_hidden += d @ W_block and
grad_weight[block] = d^T @ X as cuBLAS GEMMs with fp32 outputs (the
accumulation rides in the GEMM's beta; each grad_weight block is final at once
and stored in the weight's dtype). No atomics, and the tensor-core work is
cuBLAS's. The price is one fp32 block of `KernelOptions.block_bytes` (128 MiB on CUDA by default)
and a bf16 copy of it, never [N, V].
Backward, "fused" (`_bwd_kernel`, one program per (token tile, vocab tile)):
recompute the logit tile, form d = g * (onehot - softmax), then for each H-chunk
atomically add d @ W into grad_hidden and d^T @ X into grad_weight (fp32
buffers). It avoids the fp32 block, but its (N/BLOCK_M)*V*H + (V/BLOCK_V)*N*H
atomic adds cost: on an H100 (benchmarks/results/h100_20261128/, runs 2 and 3)
forward + backward ran at 34-36% of the bf16 matmul rate fused against 57-72%
with the GEMM backward, so "gemm" is the default. Tiles whose d is exactly zero skip
their gradient matmuls (exact, unlike a threshold on small probabilities).

Numerics: logits, logsumexp and all sums are fp32; in 16-bit, d = g * (onehot -
softmax) is formed in fp32 and rounded to the input dtype once, only as a
gradient GEMM operand (both forms). Summation order is not fixed run to run on
CUDA (differences of order 1e-7 relative); the torch backend on CPU is
deterministic. Integers that change with every batch
(token counts, split counts) are not specialised on, and the per-part buffers are
separate allocations, so a new batch size does not recompile the kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import chunked
from .backends import triton_interpreting
from .head import PLAIN, Head
from .options import DEFAULT as _DEFAULT_OPTIONS
from .options import KernelOptions
from .options import get as get_options

# Forms for 16-bit inputs (fp32 inputs always take the fused kernels), chosen per call by
# KernelOptions.forward_form / backward_form; see the module doc for the measurements behind
# the defaults. Forward: "fused" (one Triton kernel, online logsumexp over vocab tiles) or
# "gemm" (cuBLAS GEMMs into fp32 vocab blocks, one Triton reduction pass each). Backward:
# "gemm" (recompute each logits block with cuBLAS, one Triton pass for d = g * (onehot - p),
# two cuBLAS GEMMs for the gradients) or "fused" (one Triton kernel, atomics).
DEFAULT_FORMS = (_DEFAULT_OPTIONS.forward_form, _DEFAULT_OPTIONS.backward_form)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b; IEEE fp32 products for fp32 inputs (no TF32).

    UPCAST computes 16-bit products in fp32: the Triton CPU interpreter
    mis-multiplies bf16 operands, and the values are identical after upcast.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tanh(x):
    """tanh in fp32 to a few ulps, from exp and log only (the interpreter lacks libdevice):
    tanh|x| = e / (e + 2) with e = expm1(2|x|), expm1 by Kahan's (u - 1) * y / log(u)."""
    # tanh(20) is 1.0 in fp32, and exp would overflow near 88; NaN passes through.
    y = tl.minimum(2.0 * tl.abs(x), 40.0, propagate_nan=tl.PropagateNan.ALL)
    u = tl.exp(y)
    one = u == 1.0
    e = tl.where(one, y, (u - 1.0) * y / tl.where(one, 1.0, tl.log(u)))
    t = e / (e + 2.0)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _head(z, b_ptr, cols64, col_ok, scale, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Raw fp32 logits [R, C] -> softcap(scale * (z + bias)) (caldpo/kernels/head.py)."""
    if HAS_BIAS:
        z += tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = z * scale
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _head_grad(d, z, scale, softcap, SOFTCAP: tl.constexpr):
    """d * dl/dz for head logits l = z: scale * (1 - (l / softcap)^2)."""
    if SOFTCAP:
        u = z / softcap
        d = d * (1.0 - u * u)
    return d * scale


# M changes with every batch: specialising on it (divisibility by 16) would recompile per batch.
@triton.jit(do_not_specialize=["M", "n_splits"])
def _fwd_kernel(x_ptr, w_ptr, t_ptr, m_out, s_out, tgt_out,
                M, V, H, stride_xm, stride_xk, stride_wv, stride_wk, n_splits,
                b_ptr, scale, softcap,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    # This split's vocab tiles; a split left without any stores (-inf, 0, 0), which the merge ignores.
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows64, mask=row_ok, other=-1)
    ks = tl.arange(0, BLOCK_K)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    t_i = tl.zeros((BLOCK_M,), tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + ks) < H
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[:, None] * stride_wv + (k0 + ks)[None, :] * stride_wk,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(x, tl.trans(w), acc, IEEE, UPCAST)
        acc = _head(acc, b_ptr, cols64, col_ok, scale, softcap, HAS_BIAS, SOFTCAP)
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(acc, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
        m_i = m_new
    out = rows64 * n_splits + split
    tl.store(m_out + out, m_i, mask=row_ok)
    tl.store(s_out + out, s_i, mask=row_ok)
    tl.store(tgt_out + out, t_i, mask=row_ok)


@triton.jit(do_not_specialize=["M"])
def _bwd_kernel(x_ptr, w_ptr, t_ptr, g_ptr, lse_ptr, gx_ptr, gw_ptr,
                M, V, H, stride_xm, stride_xk, stride_wv, stride_wk,
                b_ptr, gb_ptr, scale, softcap,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, NEED_B: tl.constexpr):
    # Grouped order: GROUP_M token tiles sweep the vocab tiles together (see module doc).
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    v_tiles = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_M * v_tiles
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    tgt = tl.load(t_ptr + rows64, mask=row_ok, other=-1)
    g = tl.load(g_ptr + rows64, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + ks) < H
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_wv + (k0 + ks)[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(x, tl.trans(w), acc, IEEE, UPCAST)
    acc = _head(acc, b_ptr, cols64, col_ok, scale, softcap, HAS_BIAS, SOFTCAP)
    p = tl.where(col_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    d = _head_grad(g[:, None] * (onehot - p), acc, scale, softcap, SOFTCAP)
    d = tl.where(col_ok[None, :], d, 0.0)
    if tl.max(tl.abs(d)) > 0.0:
        if NEED_B:
            tl.atomic_add(gb_ptr + cols64, tl.sum(d, axis=0), mask=col_ok, sem="relaxed")
        d_in = d.to(x_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + ks) < H
            if NEED_X:
                w = tl.load(w_ptr + cols64[:, None] * stride_wv + (k0 + ks)[None, :] * stride_wk,
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                gx = _dot(d_in, w, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), IEEE, UPCAST)
                tl.atomic_add(gx_ptr + rows64[:, None] * H + (k0 + ks)[None, :], gx,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if NEED_W:
                x = tl.load(x_ptr + rows64[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                gw = _dot(tl.trans(d_in), x, tl.zeros((BLOCK_V, BLOCK_K), tl.float32), IEEE, UPCAST)
                tl.atomic_add(gw_ptr + cols64[:, None] * H + (k0 + ks)[None, :], gw,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


def _configs(shapes, **extra) -> list:
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, **extra), num_warps=w, num_stages=st)
            for bm, bv, bk, w, st in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop K tiles wider than the (power-of-2 padded) hidden size; M is not in the key.

    fp32 inputs (IEEE products, no tensor cores) keep only the first, smallest tile:
    each fp32 variant compiles slowly and none of them is the training path.
    """
    h = named_args["H"]
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(64, triton.next_power_of_2(h))] or configs[:1]
    if named_args["x_ptr"].dtype == torch.float32:
        kept = kept[:1]
    return kept


# Tiles for the CUDA autotuner, keyed on V, H and the dtypes (Hopper: 228 KiB of shared memory
# per SM, so a 256-wide tile with 3 stages at BLOCK_K=64 does not fit; such configs are skipped).
_FWD_CONFIGS = _configs([(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4)])
_BWD_CONFIGS = _configs([(64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)],
                        GROUP_M=8)

# Autotuned variants, used on CUDA only (the interpreter runs the plain kernels with small tiles).
_fwd_kernel_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["V", "H"],
                                    prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)
# The gradient buffers are accumulated atomically, so they are zeroed before each trial.
_bwd_kernel_tuned = triton.autotune(configs=_BWD_CONFIGS, key=["V", "H"],
                                    reset_to_zero=["gx_ptr", "gw_ptr", "gb_ptr"],
                                    prune_configs_by={"early_config_prune": _prune})(_bwd_kernel)


def _on_gpu(hidden: torch.Tensor) -> bool:
    return hidden.device.type == "cuda" and not triton_interpreting()


def _small_config() -> dict:
    """Tiles for the interpreter (tl.dot needs every edge >= 16)."""
    return dict(BLOCK_M=16, BLOCK_V=16, BLOCK_K=16, num_warps=1)


def _modes(dtype: torch.dtype) -> dict:
    return dict(IEEE=dtype == torch.float32, UPCAST=dtype != torch.float32 and triton_interpreting())


def _check(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton backend supports fp32/bf16/fp16, got {hidden.dtype}")
    return weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)


def _n_splits(hidden: torch.Tensor, m: int, v: int) -> int:
    """Vocab splits so that about 4 programs per SM run when tokens are few (sized for
    128-token tiles; the split bounds themselves follow the tuned BLOCK_V in the kernel)."""
    if _on_gpu(hidden):
        want = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
        return max(1, min(triton.cdiv(v, 256), triton.cdiv(want, triton.cdiv(m, 128))))
    return max(1, min(8, triton.cdiv(v, 16)))  # interpreter: several splits, so the merge is exercised


def _head_args(head: Head, device) -> tuple[tuple, dict]:
    """(bias pointer, scale, cap) kernel arguments and the HAS_BIAS / SOFTCAP flags; the bias
    is passed in its own dtype and read as fp32. With no bias a 1-element dummy is passed."""
    bias = head.bias.contiguous() if head.bias is not None else torch.zeros(1, dtype=torch.float32, device=device)
    return ((bias, float(head.scale), float(head.softcap or 1.0)),
            dict(HAS_BIAS=head.bias is not None, SOFTCAP=head.softcap is not None))


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, head: Head = PLAIN,
            options: KernelOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of target, logsumexp) per token, both [M] float32, of the logits
    head(hidden @ weight.T) (caldpo.kernels.head); `options.forward_form` picks the form
    for 16-bit inputs."""
    opts = get_options(options)
    weight = _check(hidden, weight)
    m, h = hidden.shape
    v = weight.shape[0]
    if m == 0:
        e = hidden.new_empty(0, dtype=torch.float32)
        return e, e.clone()
    if opts.forward_form == "gemm" and hidden.dtype != torch.float32:
        return _forward_gemm(hidden, weight, targets, head, opts)
    splits = _n_splits(hidden, m, v)
    part = _parts(m, splits, hidden.device)
    hargs, hflags = _head_args(head, hidden.device)
    args = (hidden, weight, targets, *part, m, v, h,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), splits, *hargs)
    if _on_gpu(hidden):
        _fwd_kernel_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits)](
            *args, **_modes(hidden.dtype), **hflags)
    else:
        cfg = _small_config()
        _fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), splits)](*args, **_modes(hidden.dtype), **hflags, **cfg)
    return _merge(part)


def _parts(m: int, n: int, device) -> list[torch.Tensor]:
    """Per-part (max, sum-exp, target logit) buffers [M, parts]: three allocations, not views of
    one, so their alignment (which Triton specialises on) does not change with the batch."""
    return [torch.empty(m, n, dtype=torch.float32, device=device) for _ in range(3)]


def _merge(part: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, lse) from per-part (max, sum-exp, target logit); an empty part is (-inf, 0, 0)."""
    lse = torch.logsumexp(part[0] + part[1].log(), dim=1)
    return part[2].sum(dim=1) - lse, lse


# ----------------------------------------------------------------------------- forward, GEMM form

@triton.jit(do_not_specialize=["cols", "col0", "n_parts", "part"])
def _lse_block_kernel(z_ptr, t_ptr, m_out, s_out, tgt_out, cols, col0, n_parts, part, b_ptr, scale, softcap,
                      BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """One row of an fp32 block of raw logits: (max, sum of exp(l - max), target's l if in the
    block) of the head logits l = head(z)."""
    row = tl.program_id(0).to(tl.int64)
    rel = tl.load(t_ptr + row) - col0
    m_i = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s_i = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    t_i = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for c0 in range(0, cols, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < cols
        z = tl.load(z_ptr + row * cols + c, mask=ok, other=0.0)
        z = _head(z[None, :], b_ptr, (col0 + c).to(tl.int64), ok, scale, softcap, HAS_BIAS, SOFTCAP).reshape(BLOCK)
        z = tl.where(ok, z, float("-inf"))
        t_i += tl.sum(tl.where(ok & (c == rel), z, 0.0), axis=0)
        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m_i = m_new
    out = row * n_parts + part
    tl.store(m_out + out, m_i)
    tl.store(s_out + out, s_i)
    tl.store(tgt_out + out, t_i)


def _forward_gemm(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, head: Head = PLAIN,
                  opts: KernelOptions = _DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward for 16-bit inputs as cuBLAS GEMMs into fp32 vocab blocks of the chunked
    backend's size, each reduced by one Triton pass; on CUDA the tokens are padded to a
    multiple of chunked.ROW_ALIGN (zero rows, dropped) so that every GEMM edge stays aligned."""
    m, v = hidden.shape[0], weight.shape[0]
    rows = chunked.aligned_rows(m)
    if _on_gpu(hidden) and rows != m:
        logp, lse = _forward_gemm(chunked.pad_rows(hidden, rows), weight, chunked.pad_rows(targets, rows), head,
                                  opts)
        return logp[:m], lse[:m]
    cv = chunked.chunk_size(v, m, cuda=hidden.is_cuda, options=opts)
    n = triton.cdiv(v, cv)
    part = _parts(m, n, hidden.device)
    block = 1024 if _on_gpu(hidden) else 32
    hargs, hflags = _head_args(head, hidden.device)
    for i, s in enumerate(range(0, v, cv)):
        z = chunked.mm32(hidden, weight[s:s + cv].T)
        _lse_block_kernel[(m,)](z, targets, *part, z.shape[1], s, n, i, *hargs, BLOCK=block, **hflags)
    return _merge(part)


# ----------------------------------------------------------------------------- backward, GEMM form

@triton.jit(do_not_specialize=["cols", "col0"])
def _dlogits_block_kernel(z_ptr, shift_ptr, g_ptr, t_ptr, out_ptr, cols, col0, b_ptr, scale, softcap,
                          BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """out[r, c] = g[r] * (onehot - exp(l[r, c] + shift[r])) * dl/dz in out's dtype, l = head(z):
    one pass over an fp32 block of raw logits whose first column is vocab entry col0."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < cols
    z = tl.load(z_ptr + row * cols + c, mask=ok, other=0.0)
    z = _head(z[None, :], b_ptr, (col0 + c).to(tl.int64), ok, scale, softcap, HAS_BIAS, SOFTCAP).reshape(BLOCK)
    sh = tl.load(shift_ptr + row)
    g = tl.load(g_ptr + row)
    rel = tl.load(t_ptr + row) - col0
    d = _head_grad(g * (tl.where(c == rel, 1.0, 0.0) - tl.exp(z + sh)), z, scale, softcap, SOFTCAP)
    tl.store(out_ptr + row * cols + c, d.to(out_ptr.dtype.element_ty), mask=ok)


def _dlogits_block(x: torch.Tensor, w: torch.Tensor, shift: torch.Tensor, g: torch.Tensor,
                   targets: torch.Tensor, col0: int, dtype: torch.dtype, head: Head = PLAIN) -> torch.Tensor:
    """g * (onehot - exp(l + shift)) * dl/dz rounded to `dtype`, l = head(x @ w.T), for the vocab
    block starting at col0: the GEMM by cuBLAS into fp32, then one Triton pass."""
    z = chunked.mm32(x, w.T)
    out = torch.empty(z.shape, dtype=dtype, device=z.device)
    block = 1024 if _on_gpu(x) else 64
    hargs, hflags = _head_args(head, x.device)
    _dlogits_block_kernel[(z.shape[0], triton.cdiv(z.shape[1], block))](
        z, shift.reshape(-1).contiguous(), g.reshape(-1).contiguous(), targets, out, z.shape[1], col0,
        *hargs, BLOCK=block, **hflags)
    return out


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool = True,
             need_weight: bool = True, head: Head | None = None, need_bias: bool = False,
             options: KernelOptions | None = None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], in fp32 (the GEMM
    form gives grad_weight in the weight's dtype: see chunked.backward); with `head` given
    (the forward's), a third item: grad_bias [V] fp32 when `need_bias`, else None.
    `options.backward_form` picks the form for 16-bit inputs."""
    opts = get_options(options)
    m, h = hidden.shape
    v = weight.shape[0]
    hd = head or PLAIN
    need_bias = need_bias and hd.bias is not None
    if opts.backward_form == "gemm" and hidden.dtype in (torch.bfloat16, torch.float16) and m > 0:
        # chunked.backward casts the weight to the hidden dtype itself, once.
        return chunked.backward(grad, hidden, weight, targets, lse, need_hidden, need_weight,
                                dlogits_block=_dlogits_block, gemm="input", head=head, need_bias=need_bias,
                                options=opts)
    w_in = _check(hidden, weight)
    gx = torch.zeros(m, h, dtype=torch.float32, device=hidden.device) if need_hidden else None
    gw = torch.zeros(v, h, dtype=torch.float32, device=hidden.device) if need_weight else None
    gb = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_bias else None
    extra = () if head is None else (gb,)
    if m == 0 or not (need_hidden or need_weight or need_bias):
        return (gx, gw) + extra
    # A gradient that is not wanted still needs a pointer; never lse (the autotuner zeroes these).
    dummy = torch.zeros(1, dtype=torch.float32, device=hidden.device)
    hargs, hflags = _head_args(hd, hidden.device)
    args = (hidden, w_in, targets, grad.float().contiguous(), lse.contiguous(),
            gx if need_hidden else dummy, gw if need_weight else dummy, m, v, h,
            hidden.stride(0), hidden.stride(1), w_in.stride(0), w_in.stride(1),
            hargs[0], gb if need_bias else dummy, *hargs[1:])
    flags = dict(**_modes(hidden.dtype), NEED_X=need_hidden, NEED_W=need_weight, NEED_B=need_bias, **hflags)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(v, meta["BLOCK_V"]),)
    if _on_gpu(hidden):
        _bwd_kernel_tuned[grid](*args, **flags)
    else:
        _bwd_kernel[grid](*args, **flags, GROUP_M=2, **_small_config())
    return (gx, gw) + extra
