"""Output heads beyond hidden @ weight.T (bias, logit scale, final soft-cap) and out-of-range
targets, on the CPU backends, against the float64 formula in conftest (Triton: test_triton.py)."""
import pytest
import torch

from caldpo.kernels import KernelOptions, linear_logprobs, sequence_logprobs

from .conftest import HEADS, make_head, make_inputs, oracle_head_logprobs, rel_err, tol
from .test_linear_logprobs import BACKENDS


def check_head(gen, hidden, weight, targets, head, backend, need=("h", "w", "b"), device="cpu", options=None):
    """Values and the gradients of hidden, weight and bias against the float64 formula
    (inputs moved to `device` for the backend, results compared on the CPU)."""
    g = torch.randn(hidden.shape[0], generator=gen, dtype=torch.float64)
    h64 = hidden.to(device, torch.float64).requires_grad_()
    w64 = weight.to(device, torch.float64).requires_grad_()
    b64 = head["bias"].to(device, torch.float64).requires_grad_() if head["bias"] is not None else None
    ref = oracle_head_logprobs(h64, w64, targets.to(device), b64, head["scale"], head["softcap"])
    leaves = [x for x in (h64, w64, b64) if x is not None]
    refs = {k: r.cpu() for k, r in zip("hwb", torch.autograd.grad((ref * g.to(device)).sum(), leaves))}
    ref = ref.detach().cpu()

    h = hidden.to(device).requires_grad_("h" in need)
    w = weight.to(device).requires_grad_("w" in need)
    b = head["bias"].to(device).requires_grad_("b" in need) if head["bias"] is not None else None
    out = linear_logprobs(h, w, targets.to(device), backend=backend, bias=b, scale=head["scale"],
                          softcap=head["softcap"], options=options)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.backward(g.float().to(device))
    out = out.cpu()
    limit = tol(hidden.dtype)
    assert rel_err(out, ref) < limit
    assert (out[targets == -100] == 0).all()
    for name, x in zip("hwb", (h, w, b)):
        if x is None or name not in need:
            continue
        assert x.grad is not None and x.grad.dtype == x.dtype and torch.isfinite(x.grad).all(), name
        assert rel_err(x.grad.cpu(), refs[name]) < limit, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", HEADS, ids=lambda s: "b%g-s%g-c%s" % s)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_matches_oracle(gen, backend, spec, dtype):
    hidden, weight, targets = make_inputs(gen, 37, 16, 131, dtype, scale=8.0)
    check_head(gen, hidden, weight, targets, make_head(gen, 131, dtype, *spec), backend)


@pytest.mark.parametrize("axis", ["vocab", "tokens"])
@pytest.mark.parametrize("gemm", ["auto", "input"])
def test_head_across_chunks(gen, axis, gemm):
    """7-wide chunks on each axis (the bias slice and the logsumexp merge per block), in the CPU
    rule and in the CUDA rule for 16-bit operands (gemm="input")."""
    n, v = 60, 131
    opts = KernelOptions(axis=axis, gemm=gemm, block_bytes=7 * 4 * (v if axis == "tokens" else n), min_block=1)
    dtype = torch.bfloat16 if gemm == "input" else torch.float32
    hidden, weight, targets = make_inputs(gen, n, 16, v, dtype, scale=8.0)
    check_head(gen, hidden, weight, targets, make_head(gen, v, dtype, 1.0, 0.5, 2.0), "torch", options=opts)


@pytest.mark.parametrize("spec", [(1.0, 0.5, 2.0), (2.0, 1.0, None)], ids=["bias-scale-cap", "bias"])
def test_head_across_native_blocks(gen, spec):
    """The native backend's vocabulary blocks (13 columns: the bias offset per block, the online
    logsumexp merge) with a head."""
    if "native" not in BACKENDS:
        pytest.skip("native backend unavailable")
    n, v = 40, 131
    opts = KernelOptions(block_bytes=13 * 4 * n, min_block=1)
    hidden, weight, targets = make_inputs(gen, n, 16, v, torch.float32, scale=8.0)
    check_head(gen, hidden, weight, targets, make_head(gen, v, torch.float32, *spec), "native", options=opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need", [("b",), ("h",), ("w", "b")])
def test_head_partial_grads(gen, backend, need):
    """Only some of hidden, weight, bias require grad (a frozen head, a frozen bias)."""
    hidden, weight, targets = make_inputs(gen, 19, 16, 37, torch.float32, scale=4.0)
    check_head(gen, hidden, weight, targets, make_head(gen, 37, torch.float32, 1.0, 0.5, 2.0), backend, need)


def test_sequence_logprobs_with_head(gen):
    """sequence_logprobs passes the head through, with the Hugging Face shift."""
    b, t, d, v = 3, 9, 16, 41
    hidden = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, :2] = -100
    tok = oracle_head_logprobs(hidden[:, :-1].reshape(-1, d), weight, labels[:, 1:].reshape(-1), bias, 0.25, 1.5)
    ref = tok.view(b, t - 1).sum(1)
    out = sequence_logprobs(hidden.float(), weight.float(), labels, backend="torch", bias=bias.float(),
                            scale=0.25, softcap=1.5)
    assert rel_err(out, ref) < 1e-5


def test_plain_head_keywords_are_the_default(gen):
    hidden, weight, targets = make_inputs(gen, 13, 8, 29, torch.float32)
    a = linear_logprobs(hidden, weight, targets, backend="torch")
    b = linear_logprobs(hidden, weight, targets, backend="torch", bias=None, scale=1.0, softcap=None)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [
    (dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"), (dict(softcap=0.0), "softcap"),
    (dict(softcap=-1.0), "softcap"), (dict(bias=torch.zeros(5)), "bias")])
def test_bad_head_values(kw, match):
    with pytest.raises(ValueError, match=match):
        linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.zeros(3, dtype=torch.long), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [7, 12, -1, -101])
def test_out_of_range_target_raises(backend, bad):
    """A target >= V or < 0 (other than ignore_index) is an error naming it and V, never a value
    (torch once returned -logsumexp for it); with or without ignored tokens beside it."""
    h, w = torch.randn(5, 4), torch.randn(7, 4)
    for t in (torch.tensor([1, bad, 2, 3, 4]), torch.tensor([1, bad, -100, 3, -100])):
        with pytest.raises(ValueError, match=rf"\[0, 7\).*first: {bad} at position 1"):
            linear_logprobs(h, w, t, backend=backend)
    with pytest.raises(ValueError, match="outside the head's vocabulary"):
        sequence_logprobs(h[None], w, torch.tensor([[0, 1, bad, 2, 3]]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_ignore_index_and_edge_targets(backend):
    """Targets 0 and V-1 are fine; with ignore_index=-1 the value -1 is skipped, -100 is not."""
    h, w = torch.randn(4, 4), torch.randn(7, 4)
    out = linear_logprobs(h, w, torch.tensor([0, 6, -1, 3]), ignore_index=-1, backend=backend)
    assert out[2] == 0 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="-100"):
        linear_logprobs(h, w, torch.tensor([0, 6, -100, 3]), ignore_index=-1, backend=backend)
