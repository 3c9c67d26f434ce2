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
from . import head as head_mod
from .backends import resolve_backend
from .head import Head
from .options import KernelOptions, decode
from .options import get as get_options
from .reference import reference_linear_logprobs


def _impl(backend: str):
    if backend == "triton":
        from . import triton_logprobs

        return triton_logprobs
    if backend == "native":
        from . import native

        return native
    return chunked


def _out_of_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Bool mask of the targets that are neither in [0, vocab) nor ignore_index."""
    return ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)


def _raise_out_of_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = _out_of_range(targets, vocab, ignore_index).nonzero().squeeze(1)
    first = int(bad[0])
    raise ValueError(
        f"linear_logprobs: {bad.numel()} target(s) outside the head's vocabulary [0, {vocab}) and not "
        f"ignore_index={ignore_index} (first: {int(targets[first])} at position {first}); token ids must "
        f"be < the output head's rows (a tokenizer larger than the model? resize the embeddings)")


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises ValueError naming the first target outside [0, vocab) that is not ignore_index.

    Synchronises on CUDA (`.item()`): for the reference path and direct callers; the fused
    op checks inside `_kept` without a sync of its own.
    """
    if bool(_out_of_range(targets, vocab, ignore_index).any()):
        _raise_out_of_range(targets, vocab, ignore_index)


def _kept(targets: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """Indices of the tokens to score, ascending (one host sync: `nonzero`'s size); raises
    ValueError when a target is outside [0, vocab) and not ignore_index.

    When every token is kept this is arange(N), and consumers skip the gathers.

    The range check adds no host sync on CUDA: the "any target out of range" flag is copied
    to pinned host memory with a non-blocking copy queued *before* `nonzero`, whose size
    read synchronises the stream, so the flag has landed when `nonzero` returns and is read
    from host memory. (torch._assert_async would also avoid the sync, but a device-side
    assert kills the CUDA context with a message that names neither the target nor V.)
    On CPU everything is synchronous anyway.
    """
    bad = _out_of_range(targets, vocab, ignore_index).any()
    if targets.is_cuda:
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(bad, non_blocking=True)
    else:
        flag = bad
    idx = (targets != ignore_index).nonzero().squeeze(1)
    if bool(flag):
        _raise_out_of_range(targets, vocab, ignore_index)
    return idx


def _head(bias: torch.Tensor | None, scale: float, softcap: float) -> Head:
    """The op-level encoding (softcap 0.0 = no cap) back to a `Head`."""
    return Head(bias, float(scale), float(softcap) if softcap > 0.0 else None)


@torch.library.custom_op("caldpo::linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
            ignore_index: int, backend: str, scale: float, softcap: float, options: str,
            kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], lse [N], kept index [K]) in fp32 / int64; ignored tokens are dropped
    before any matmul. The index is returned so that backward reuses it without a sync.
    `bias`, `scale`, `softcap` (0.0: none) describe the head (caldpo.kernels.head);
    `options` is a KernelOptions.encode() string; `kept`: the caller's index (see linear_logprobs),
    which replaces the search for it."""
    n = hidden.shape[0]
    if kept is None:
        idx = _kept(targets, ignore_index, weight.shape[0])
    else:
        if not targets.is_cuda:  # the host check costs no sync; on CUDA the caller vouches
            check_targets(targets, weight.shape[0], ignore_index)
        idx = kept.long().clone()  # an op's output must not alias its input
    impl = _impl(backend)
    head = _head(bias, scale, softcap)
    kw = {"options": decode(options)} if head.plain else {"head": head, "options": decode(options)}
    if idx.numel() == n:
        logp, lse = impl.forward(hidden, weight, targets, **kw)
        return logp, lse, idx
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if idx.numel():
        lp_c, lse_c = impl.forward(hidden.index_select(0, idx), weight, targets.index_select(0, idx), **kw)
        logp.index_copy_(0, idx, lp_c)
        lse.index_copy_(0, idx, lse_c)
    return logp, lse, idx


@_fwd_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, backend, scale, softcap, options, kept=None):
    n = hidden.shape[0]
    k = kept.shape[0] if kept is not None else torch.library.get_ctx().new_dynamic_size()
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(n, **f32), hidden.new_empty(n, **f32), targets.new_empty(k, dtype=torch.long)


@torch.library.custom_op("caldpo::linear_logprobs_bwd", mutates_args=())
def _bwd_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            lse: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None, backend: str, scale: float,
            softcap: float, options: str, need_hidden: bool, need_weight: bool, need_bias: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; an unneeded one is an
    empty tensor.

    `idx` is the forward's kept index, so no host sync happens here.
    """
    impl = _impl(backend)
    head = _head(bias, scale, softcap)
    kw = {"options": decode(options)}
    if not head.plain:
        kw.update(head=head, need_bias=need_bias)
    if idx.numel() == hidden.shape[0]:
        gh, gw, *gb = impl.backward(grad, hidden, weight, targets, lse, need_hidden, need_weight, **kw)
    else:
        gh_c, gw, *gb = impl.backward(grad.index_select(0, idx), hidden.index_select(0, idx), weight,
                                      targets.index_select(0, idx), lse.index_select(0, idx),
                                      need_hidden, need_weight, **kw)
        gh = None
        if need_hidden:
            gh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            gh.index_copy_(0, idx, gh_c.to(hidden.dtype))
            del gh_c
    gh = gh.to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    gw = gw.to(weight.dtype) if need_weight else weight.new_empty(0)
    gb = gb[0] if gb and gb[0] is not None else None
    gb = gb.to(bias.dtype) if need_bias and gb is not None else hidden.new_empty(0)
    return gh, gw, gb


@_bwd_op.register_fake
def _(grad, hidden, weight, targets, lse, idx, bias, backend, scale, softcap, options, need_hidden,
      need_weight, need_bias):
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, backend, scale, softcap, options, *_ = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1], output[2], bias)
    ctx.set_materialize_grads(False)
    ctx.backend, ctx.scale, ctx.softcap, ctx.options = backend, scale, softcap, options


def _backward(ctx, grad_logp, grad_lse, grad_idx):
    hidden, weight, targets, lse, idx, bias = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[3]
    if grad_logp is None or not (need_h or need_w or need_b):
        return (None,) * 10
    gh, gw, gb = _bwd_op(grad_logp.contiguous(), hidden, weight, targets, lse, idx, bias,
                         ctx.backend, ctx.scale, ctx.softcap, ctx.options, need_h, need_w, need_b)
    return (gh if need_h else None), (gw if need_w else None), None, (gb if need_b else None), \
        None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: str) -> str:
    """resolve_backend, run once when traced: its availability checks (imports, a build
    lock) are host work that torch.compile should not trace into the graph."""
    return resolve_backend(backend, torch.device(device))


def _backend(backend: str, opts: KernelOptions) -> str:
    """The backend argument wins over the options' unless it is "auto"."""
    return opts.backend if backend == "auto" else backend


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int = -100, backend: str = "auto", *,
                    bias: torch.Tensor | None = None, scale: float = 1.0,
                    softcap: float | None = None, options: KernelOptions | None = None,
                    kept: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax(logits)[targets] per token -> [N] float32, where
    logits = softcap * tanh(scale * (hidden @ weight.T + bias) / softcap)
    (no bias / scale 1 / softcap None leave out that step; caldpo.kernels.head).

    hidden [N,H], weight [V,H], targets [N] (int64), bias [V] or None, scale a non-zero
    float, softcap a float > 0 or None. 0.0 where targets == ignore_index.
    Differentiable w.r.t. hidden, weight and bias. Only the reference backend allocates
    [N, V]; the others keep a logsumexp per token. `options` (caldpo.kernels.KernelOptions;
    None: the defaults) sets the backend, block budget and forms; a `backend` other than
    "auto" overrides `options.backend`. Raises ValueError for bad shapes or head
    values, and for a target outside [0, V) that is not ignore_index (on every backend;
    on CUDA without a host sync of its own, see `_kept`).

    kept: [K] int64/int32 on hidden's device, the ascending positions whose target is not
    ignore_index, when the caller knows them from host data (the trainer's collator does). The
    call then does no `nonzero` and no host sync at all; the caller vouches that the index is
    exactly those positions and that their targets lie in [0, V) (checked here only for CPU
    tensors; the trainer checks its tokenizer's ids against the head once, at load). K == N
    (every token scored) skips the gathers.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N,H] and weight [V,H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N={hidden.shape[0]}")
    head = head_mod.make(bias, scale, softcap, weight.shape[0])
    opts = get_options(options)
    name = _resolve(_backend(backend, opts), str(hidden.device))
    if kept is not None and kept.dim() != 1:
        raise ValueError(f"kept must be a 1-D index, got shape {tuple(kept.shape)}")
    if name == "reference":
        check_targets(targets, weight.shape[0], ignore_index)
        return reference_linear_logprobs(hidden, weight, targets, ignore_index, head=head)
    return _fwd_op(hidden.contiguous(), weight, targets.long().contiguous(), bias, int(ignore_index), name,
                   head.scale, head.softcap or 0.0, opts.encode(), kept)[0]


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      average_log_prob: bool = False, backend: str = "auto",
                      ignore_index: int = -100, *, bias: torch.Tensor | None = None,
                      scale: float = 1.0, softcap: float | None = None,
                      options: KernelOptions | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence log-prob of the labels -> [B] float32.

    Hugging Face shift: hidden[:, t] predicts labels[:, t+1]; labels equal to
    `ignore_index` (and the first position) are skipped. Sum over the scored
    tokens, or their mean when `average_log_prob`; a sequence with no scored
    token gives 0.0 either way. `bias`, `scale`, `softcap`: the output head, and `options`
    (KernelOptions), as in `linear_logprobs`. `kept`: the scored positions of the flattened
    [B*T] shifted targets (``b * T + t`` where labels[b, t + 1] != ignore_index), ascending, as in
    `linear_logprobs` (no host sync when given).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B,T,H] and labels [B,T], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    b, t, h = hidden.shape
    targets = torch.full_like(labels, ignore_index, dtype=torch.long)
    targets[:, :-1] = labels[:, 1:]
    tok = linear_logprobs(hidden.reshape(b * t, h), weight, targets.reshape(-1), ignore_index, backend,
                          bias=bias, scale=scale, softcap=softcap, options=options, kept=kept)
    total = tok.view(b, t).sum(dim=1)
    if not average_log_prob:
        return total
    count = (targets != ignore_index).sum(dim=1).clamp(min=1)
    return total / count
