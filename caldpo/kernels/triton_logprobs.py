"""Triton backend: fused head matmul + log-softmax + target gather, forward and backward.

Both entry points take *compacted* inputs (ignored tokens already removed).

Forward (`_fwd_kernel`, grid = token tiles x vocab splits): each program
multiplies a [BLOCK_M, H] hidden tile by [BLOCK_V, H] weight tiles of its
vocab split, keeps an online (max, sum-exp) per row and picks the target logit
in the same pass. Splitting the vocab gives enough programs when there are few
tokens; the per-split (max, sum) pairs are merged with one tiny torch
logsumexp. Only the logsumexp per token [M] is saved for backward.

Backward (`_bwd_kernel`, one program per (token tile, vocab tile)): each
program recomputes its logit tile, forms d = g * (onehot - softmax), then for
each H-chunk atomically adds d @ W into grad_hidden and d^T @ X into
grad_weight, both fp32 buffers. Why atomics: without them, grad_hidden needs
either a [BLOCK_M, H] accumulator (too large for H in the thousands) or a
second full recomputation of the logits; with them the whole op costs the
8NHV floor (2 forward + 2 recompute + 4 for the two gradients). The price is
atomic traffic: (N/BLOCK_M) * V * H adds into grad_weight and
(V/BLOCK_V) * N * H into grad_hidden, so on CUDA the tile shape is autotuned
(keyed on V, H and dtypes) over four configs with BLOCK_M and BLOCK_V up to 256
(4x fewer grad_weight atomics than the former fixed 64 x 128 tile at
BLOCK_M=256), and programs are ordered in groups of GROUP_M token tiles so
that the programs running at once spread over several token tiles *and*
several vocab tiles instead of all hitting one grad_weight row block.
Summation order is run-to-run non-deterministic in fp32 (differences of
order 1e-7 relative); the torch backend is deterministic. Tiles whose d is
exactly zero everywhere (padding rows, softmax underflow) skip the gradient
matmuls: this filter is exact, unlike a threshold on small probabilities.

fp32 inputs use IEEE fp32 dot products (no TF32) so results meet fp32
tolerances; bf16/fp16 inputs use the tensor cores, with d rounded to the input
dtype for the gradient products and all sums kept in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backends import triton_interpreting


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
def _fwd_kernel(x_ptr, w_ptr, t_ptr, m_out, s_out, tgt_out,
                M, V, H, stride_xm, stride_xk, stride_wv, stride_wk, tiles_per_split, n_splits,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
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
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(acc, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
        m_i = m_new
    out = rows64 * n_splits + split
    tl.store(m_out + out, m_i, mask=row_ok)
    tl.store(s_out + out, s_i, mask=row_ok)
    tl.store(tgt_out + out, t_i, mask=row_ok)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, t_ptr, g_ptr, lse_ptr, gx_ptr, gw_ptr,
                M, V, H, stride_xm, stride_xk, stride_wv, stride_wk,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr):
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
    p = tl.where(col_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    d = g[:, None] * (onehot - p)
    if tl.max(tl.abs(d)) > 0.0:
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


def _bwd_configs() -> list:
    """Backward tiles for the CUDA autotuner: larger BLOCK_M / BLOCK_V cut atomic traffic."""
    shapes = [(64, 128, 64, 4), (128, 128, 64, 3), (128, 256, 64, 3), (256, 128, 64, 3)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, GROUP_M=8), num_warps=8, num_stages=st)
            for bm, bv, bk, st in shapes]


def _prune_bwd(configs, named_args, **kwargs):
    """Drop K tiles wider than the (power-of-2 padded) hidden size; M is not in the key."""
    h = named_args["H"]
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(64, triton.next_power_of_2(h))]
    return kept or configs[:1]


# Autotuned variant used on CUDA only (the interpreter runs the plain kernel with small tiles).
# Both gradient buffers are accumulated atomically, so they are zeroed before each trial.
_bwd_kernel_tuned = triton.autotune(configs=_bwd_configs(), key=["V", "H"], reset_to_zero=["gx_ptr", "gw_ptr"],
                                    prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_kernel)


def _config(hidden: torch.Tensor, h: int) -> dict:
    """Tile sizes: small under the interpreter (tl.dot needs >= 16), Hopper-sized on GPU."""
    if triton_interpreting() or hidden.device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_V=16, BLOCK_K=16, num_warps=1)
    block_k = 64 if h >= 64 else max(16, triton.next_power_of_2(h))
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=block_k, num_warps=8, num_stages=3)


def _modes(dtype: torch.dtype) -> dict:
    return dict(IEEE=dtype == torch.float32, UPCAST=dtype != torch.float32 and triton_interpreting())


def _check(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton backend supports fp32/bf16/fp16, got {hidden.dtype}")
    return weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)


def _n_splits(hidden: torch.Tensor, m_tiles: int, v_tiles: int) -> int:
    if hidden.device.type == "cuda":
        want = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    else:
        want = 8  # interpreter: several vocab splits, so the merge is exercised
    return max(1, min(v_tiles, triton.cdiv(want, m_tiles)))


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of target, logsumexp) per token, both [M] float32."""
    weight = _check(hidden, weight)
    m, h = hidden.shape
    v = weight.shape[0]
    if m == 0:
        e = hidden.new_empty(0, dtype=torch.float32)
        return e, e.clone()
    cfg = _config(hidden, h)
    m_tiles = triton.cdiv(m, cfg["BLOCK_M"])
    v_tiles = triton.cdiv(v, cfg["BLOCK_V"])
    splits = _n_splits(hidden, m_tiles, v_tiles)
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # every split owns at least one vocab column
    part = torch.empty(3, m, splits, dtype=torch.float32, device=hidden.device)
    _fwd_kernel[(m_tiles, splits)](
        hidden, weight, targets, part[0], part[1], part[2], m, v, h,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        tiles_per_split, splits, **_modes(hidden.dtype), **cfg)
    lse = torch.logsumexp(part[0] + part[1].log(), dim=1)
    return part[2].sum(dim=1) - lse, lse


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool = True,
             need_weight: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], in fp32."""
    w_in = _check(hidden, weight)
    m, h = hidden.shape
    v = weight.shape[0]
    gx = torch.zeros(m, h, dtype=torch.float32, device=hidden.device) if need_hidden else None
    gw = torch.zeros(v, h, dtype=torch.float32, device=hidden.device) if need_weight else None
    if m == 0 or not (need_hidden or need_weight):
        return gx, gw
    # A gradient that is not wanted still needs a pointer; never lse (the autotuner zeroes these).
    dummy = torch.zeros(1, dtype=torch.float32, device=hidden.device)
    args = (hidden, w_in, targets, grad.float().contiguous(), lse.contiguous(),
            gx if need_hidden else dummy, gw if need_weight else dummy, m, v, h,
            hidden.stride(0), hidden.stride(1), w_in.stride(0), w_in.stride(1))
    flags = dict(**_modes(hidden.dtype), NEED_X=need_hidden, NEED_W=need_weight)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(v, meta["BLOCK_V"]),)
    if hidden.device.type == "cuda" and not triton_interpreting():
        _bwd_kernel_tuned[grid](*args, **flags)
    else:
        cfg = _config(hidden, h)
        _bwd_kernel[grid](*args, **flags, GROUP_M=2, **cfg)
    return gx, gw
