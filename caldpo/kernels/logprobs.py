"""Fused output-head log-probs: `linear_logprobs` and `sequence_logprobs`.

The torch and triton backends run behind one `torch.library` custom op pair
(`caldpo::linear_logprobs_fwd` / `_bwd`) so that `torch.compile` treats them as
opaque calls with known output shapes instead of tracing the chunk loops or
the data-dependent compaction of ignored tokens. Autograd is registered on
the forward op; nothing is kept across calls, so the weight may be an FSDP2
unsharded parameter that exists only during the root module's forward.
"""
from __future__ import annotations

import torch

from . import chunked
from .backends import resolve_backend
from .reference import reference_linear_logprobs


def _impl(backend: str):
    if backend == "triton":
        from . import triton_logprobs

        return triton_logprobs
    if backend == "native":
        from . import native

        return native
    return chunked


def _kept(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Indices of the tokens to score, ascending (one host sync: `nonzero`'s size).

    When every token is kept this is arange(N), and consumers skip the gathers.
    """
    return (targets != ignore_index).nonzero().squeeze(1)


@torch.library.custom_op("caldpo::linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            ignore_index: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], lse [N], kept index [K]) in fp32 / int64; ignored tokens are dropped
    before any matmul. The index is returned so that backward reuses it without a sync."""
    n = hidden.shape[0]
    idx = _kept(targets, ignore_index)
    impl = _impl(backend)
    if idx.numel() == n:
        logp, lse = impl.forward(hidden, weight, targets)
        return logp, lse, idx
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if idx.numel():
        lp_c, lse_c = impl.forward(hidden.index_select(0, idx), weight, targets.index_select(0, idx))
        logp.index_copy_(0, idx, lp_c)
        lse.index_copy_(0, idx, lse_c)
    return logp, lse, idx


@_fwd_op.register_fake
def _(hidden, weight, targets, ignore_index, backend):
    n = hidden.shape[0]
    k = torch.library.get_ctx().new_dynamic_size()
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(n, **f32), hidden.new_empty(n, **f32), targets.new_empty(k, dtype=torch.long)


@torch.library.custom_op("caldpo::linear_logprobs_bwd", mutates_args=())
def _bwd_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            lse: torch.Tensor, idx: torch.Tensor, backend: str, need_hidden: bool,
            need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight) in the inputs' dtypes; an unneeded one is an empty tensor.

    `idx` is the forward's kept index, so no host sync happens here.
    """
    impl = _impl(backend)
    if idx.numel() == hidden.shape[0]:
        gh, gw = impl.backward(grad, hidden, weight, targets, lse, need_hidden, need_weight)
    else:
        gh_c, gw = impl.backward(grad.index_select(0, idx), hidden.index_select(0, idx), weight,
                                 targets.index_select(0, idx), lse.index_select(0, idx),
                                 need_hidden, need_weight)
        gh = None
        if need_hidden:
            gh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            gh.index_copy_(0, idx, gh_c.to(hidden.dtype))
            del gh_c
    gh = gh.to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    gw = gw.to(weight.dtype) if need_weight else weight.new_empty(0)
    return gh, gw


@_bwd_op.register_fake
def _(grad, hidden, weight, targets, lse, idx, backend, need_hidden, need_weight):
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    return gh, gw


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.backend = backend


def _backward(ctx, grad_logp, grad_lse, grad_idx):
    hidden, weight, targets, lse, idx = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_logp is None or not (need_h or need_w):
        return None, None, None, None, None
    gh, gw = _bwd_op(grad_logp.contiguous(), hidden, weight, targets, lse, idx,
                     ctx.backend, need_h, need_w)
    return (gh if need_h else None), (gw if need_w else None), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: str) -> str:
    """resolve_backend, run once when traced: its availability checks (imports, a build
    lock) are host work that torch.compile should not trace into the graph."""
    return resolve_backend(backend, torch.device(device))


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int = -100, backend: str = "auto") -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[targets] per token -> [N] float32.

    hidden [N,H], weight [V,H], targets [N] (int64). 0.0 where targets ==
    ignore_index. Differentiable w.r.t. hidden and weight. Only the reference
    backend allocates [N, V]; the others keep a logsumexp per token.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N,H] and weight [V,H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N={hidden.shape[0]}")
    name = _resolve(backend, str(hidden.device))
    if name == "reference":
        return reference_linear_logprobs(hidden, weight, targets, ignore_index)
    return _fwd_op(hidden.contiguous(), weight, targets.long().contiguous(), int(ignore_index), name)[0]


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      average_log_prob: bool = False, backend: str = "auto",
                      ignore_index: int = -100) -> torch.Tensor:
    """Per-sequence log-prob of the labels -> [B] float32.

    Hugging Face shift: hidden[:, t] predicts labels[:, t+1]; labels equal to
    `ignore_index` (and the first position) are skipped. Sum over the scored
    tokens, or their mean when `average_log_prob`; a sequence with no scored
    token gives 0.0 either way.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B,T,H] and labels [B,T], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    b, t, h = hidden.shape
    targets = torch.full_like(labels, ignore_index, dtype=torch.long)
    targets[:, :-1] = labels[:, 1:]
    tok = linear_logprobs(hidden.reshape(b * t, h), weight, targets.reshape(-1), ignore_index, backend)
    total = tok.view(b, t).sum(dim=1)
    if not average_log_prob:
        return total
    count = (targets != ignore_index).sum(dim=1).clamp(min=1)
    return total / count
