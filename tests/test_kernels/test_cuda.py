"""The CUDA paths against the float64 oracle, at the sizes training uses (skipped without CUDA).

Run by benchmarks/gpu_suite.sh on a GPU machine: the Triton kernels compiled
(not interpreted, autotuned backward included) and the torch backend's 16-bit
GEMM rule, with the Pythia vocabulary (50304, a multiple of no tile), odd
token counts, half the tokens ignored, and bf16/fp16/fp32 inputs.
"""
import pytest
import torch

from caldpo.kernels import KernelOptions, linear_logprobs, preference_loss, sequence_logprobs
from caldpo.kernels.backends import triton_interpreting

from .conftest import eager_and_compiled, make_inputs, oracle_logprobs, rel_err, tol

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or triton_interpreting(),
                                reason="needs a CUDA device (and TRITON_INTERPRET unset)")
BACKENDS = ["triton", "triton-gemm", "triton-fused", "torch"]
# Triton variants: the defaults, every 16-bit step as GEMM + Triton pass, every step one fused kernel.
FORMS = {"triton-gemm": ("gemm", "gemm"), "triton-fused": ("fused", "fused")}


def _name(backend):
    return "triton" if backend.startswith("triton") else backend


def _options(backend) -> KernelOptions:
    """The Triton variant's forms as options (the defaults for the others)."""
    if backend in FORMS:
        return KernelOptions(forward_form=FORMS[backend][0], backward_form=FORMS[backend][1])
    return KernelOptions()


def compare(gen, backend, n, h, v, dtype, scale=1.0):
    """Values and both gradients on CUDA vs the float64 oracle (computed on the GPU too)."""
    hidden, weight, targets = make_inputs(gen, n, h, v, dtype, scale=scale, ignore_frac=0.5)
    hidden, weight, targets = hidden.cuda(), weight.cuda(), targets.cuda()
    g = torch.randn(n, generator=gen, dtype=torch.float64).cuda()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = oracle_logprobs(h64, w64, targets)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h64, w64))
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_logprobs(x, w, targets, backend=_name(backend), options=_options(backend))
    out.backward(g.float())
    errs = {"logp": rel_err(out, ref), "grad_hidden": rel_err(x.grad, ref_gh), "grad_weight": rel_err(w.grad, ref_gw)}
    print(f"{backend} n={n} h={h} v={v} {dtype}: " + ", ".join(f"{k} {e:.2e}" for k, e in errs.items()))
    assert out.dtype == torch.float32 and x.grad.dtype == dtype and w.grad.dtype == dtype
    assert all(torch.isfinite(t).all() for t in (out, x.grad, w.grad))
    assert (out[targets == -100] == 0).all() and (x.grad[targets == -100] == 0).all()
    assert max(errs.values()) < tol(dtype), errs


@pytest.mark.parametrize("backend,dtype", [("triton", torch.bfloat16), ("triton", torch.float16),
                                           ("triton", torch.float32), ("triton-gemm", torch.bfloat16),
                                           ("triton-fused", torch.bfloat16), ("torch", torch.bfloat16),
                                           ("torch", torch.float16)])
def test_pythia_head(gen, backend, dtype):
    compare(gen, backend, 777, 1024, 50304, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 64, 50304), (333, 100, 1000), (4099, 128, 3001)])
def test_odd_shapes(gen, backend, shape):
    compare(gen, backend, *shape, torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "torch"])  # fp32: both Triton forms are the fused kernels
def test_large_logits(gen, backend):
    compare(gen, backend, 257, 256, 5003, torch.float32, scale=60.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step(gen, backend):
    """sequence_logprobs + Cal-DPO under torch.compile(fullgraph) equal eager, on CUDA."""
    b, t, h, v = 4, 65, 128, 5003
    emb = (torch.randn(v, h, generator=gen) / h ** 0.5).cuda().to(torch.bfloat16)
    ids = torch.randint(0, v, (b, t), generator=gen).cuda()
    labels = ids.clone()
    labels[:, :20] = -100
    ref = torch.randn(b, generator=gen).cuda() * 5 - 100

    def step(e):
        lp = sequence_logprobs(torch.tanh(e[ids]), e, labels, backend=_name(backend), options=_options(backend))
        losses, _, _ = preference_loss(lp[:2], lp[2:], ref[:2], ref[2:], 0.1, loss="caldpo", backend="compiled")
        return losses.mean()

    (e, ge), (c, gc) = eager_and_compiled(step, emb)
    assert rel_err(c, e) < 1e-4 and rel_err(gc, ge) < 2e-2


def _compiled_variants(fn) -> int:
    """How many compiled variants a Triton JIT function holds (0 when this Triton hides it)."""
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no device_caches on its JIT functions")
    return sum(len(c[0]) for c in caches.values() if isinstance(c, tuple) and isinstance(c[0], dict))


def test_no_recompile_across_batch_sizes(gen):
    """A new token count must not compile the kernels again (each compile costs about a second
    per training step): after the first sizes, the number of compiled variants stays put."""
    from caldpo.kernels import triton_logprobs
    w = (torch.randn(5003, 128, generator=gen) / 12).cuda().to(torch.bfloat16).requires_grad_()

    def run(m):
        x = torch.randn(m, 128, generator=gen).cuda().to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, 5003, (m,), generator=gen).cuda()
        linear_logprobs(x, w, t, backend="triton").sum().backward()
    names = ("_fwd_kernel", "_dlogits_block_kernel")
    run(1000)
    run(1001)
    before = {n: _compiled_variants(getattr(triton_logprobs, n)) for n in names}
    for m in (1002, 1003, 1013, 1024, 1031, 2047, 4093):
        run(m)
    after = {n: _compiled_variants(getattr(triton_logprobs, n)) for n in names}
    assert all(v > 0 for v in before.values()), before
    assert after == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_bias_scale_softcap(gen, backend):
    """A Gemma/Phi-like head (bias, scale, soft-cap 30 with logits of tens) at training sizes, bf16."""
    from .conftest import make_head
    from .test_head import check_head
    hidden, weight, targets = make_inputs(gen, 777, 1024, 50304, torch.bfloat16, scale=60.0, ignore_frac=0.5)
    head = make_head(gen, 50304, torch.bfloat16, 1.0, 0.5, 30.0)
    check_head(gen, hidden, weight, targets, head, _name(backend), device="cuda", options=_options(backend))


def test_out_of_range_target_without_extra_sync(gen):
    """The target-range check adds no host sync: forward synchronises once (the nonzero of the
    kept tokens), backward never; a bad target still raises a ValueError naming it."""
    hidden, weight, targets = make_inputs(gen, 300, 64, 1001, torch.bfloat16, ignore_frac=0.3)
    x, w, t = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_(), targets.cuda()
    import warnings
    linear_logprobs(x, w, t, backend="triton").sum().backward()  # warm-up: compiles, allocates
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as fwd:
            warnings.simplefilter("always")
            out = linear_logprobs(x, w, t, backend="triton")
        with warnings.catch_warnings(record=True) as bwd:
            warnings.simplefilter("always")
            out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(m.message) for m in fwd if "synchroniz" in str(m.message)]
    assert len(syncs) == 1, syncs
    assert not [m for m in bwd if "synchroniz" in str(m.message)], [str(m.message) for m in bwd]
    bad = t.clone()
    bad[7] = 1001
    with pytest.raises(ValueError, match=r"\[0, 1001\).*first: 1001 at position 7"):
        linear_logprobs(x, w, bad, backend="triton")
    bad[7] = -5
    with pytest.raises(ValueError, match="first: -5 at position 7"):
        linear_logprobs(x, w, bad, backend="torch")
