"""Native CPU backend (csrc/caldpo_native.cpp) against a float64 oracle written here.

Driven through native.forward / native.backward directly (compacted inputs: no
ignored targets). The first run on a machine compiles the extension (about
30-60 s, then cached); every test skips with the reason when it cannot be built.
"""
import pytest
import torch

from caldpo.kernels import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native backend unavailable: {native.unavailable_reason()}")


def oracle(hidden, weight, targets, upstream):
    """float64: log_softmax of the full logits gathered at targets, and autograd grads of sum(upstream * logp)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.T
    logp = torch.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    lse = torch.logsumexp(logits, dim=1)
    gh, gw = torch.autograd.grad((logp * upstream.double()).sum(), (h, w))
    return logp.detach(), lse.detach(), gh, gw


def rel(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN/inf anywhere in `out` gives inf (never passes)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def inputs(gen, m, h, v, dtype, scale=1.0):
    hidden = torch.randn(m, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale / h ** 0.5)
    targets = torch.randint(0, v, (m,), generator=gen)
    upstream = torch.randn(m, generator=gen, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), targets, upstream


def check(hidden, weight, targets, upstream, tol, chunk_bytes=None):
    # The oracle sees the same (possibly rounded) inputs, so the tolerance measures the kernel only.
    ref_lp, ref_lse, ref_gh, ref_gw = oracle(hidden, weight, targets, upstream)
    lp, lse = native.forward(hidden, weight, targets, chunk_bytes=chunk_bytes)
    assert lp.dtype == lse.dtype == torch.float32 and lp.shape == lse.shape == targets.shape
    gh, gw = native.backward(upstream.float(), hidden, weight, targets, lse, True, True,
                             chunk_bytes=chunk_bytes)
    assert gh.dtype == gw.dtype == torch.float32
    assert gh.shape == hidden.shape and gw.shape == weight.shape
    errs = {"logp": rel(lp, ref_lp), "lse": rel(lse, ref_lse), "grad_hidden": rel(gh, ref_gh),
            "grad_weight": rel(gw, ref_gw)}
    assert all(e < tol for e in errs.values()), errs


# (M, H, V): odd sizes; V not a multiple of the vocabulary block (256 columns at least).
SHAPES = [(1, 4, 3), (37, 16, 37), (29, 24, 1031), (300, 32, 1031), (130, 8, 5000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_matches_oracle(gen, shape, dtype, tol):
    check(*inputs(gen, *shape, dtype), tol)


@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_large_logits(gen, scale):
    check(*inputs(gen, 33, 16, 1031, torch.float32, scale=scale), 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_many_row_and_vocab_blocks(gen, dtype, tol):
    """More than 4096 tokens (several row blocks, grad_weight accumulated) and a tiny budget
    (many ragged vocabulary blocks, online logsumexp merged across them)."""
    check(*inputs(gen, 4100, 8, 1031, dtype), tol, chunk_bytes=4)


def test_long_small_tail_is_not_rounded_away(gen):
    """A language model's row: a few logits near the max, then tens of thousands of small terms
    exp(x - max) ~ 3e-7, each below half an ulp of a running fp32 sum of ~10. One fp32 accumulator
    over the row drops (or rounds up) every one of them; the logsumexp must still be right to fp32."""
    v, m = 49152, 6
    logits = torch.full((m, v), -15.0, dtype=torch.float64)
    logits[:, :24] = torch.rand(m, 24, generator=gen, dtype=torch.float64) - 0.5  # the head of the row first
    for i in range(1, m):
        logits[i] = logits[i, torch.randperm(v, generator=gen)]  # and anywhere in it
    hidden, weight = torch.eye(m), logits.T.contiguous().float()  # hidden @ weight^T = the logits, exactly
    targets = torch.randint(0, v, (m,), generator=gen)
    ref_lp, ref_lse, _, _ = oracle(hidden, weight, targets, torch.ones(m))
    lp, lse = native.forward(hidden, weight, targets)
    assert (lse.double() - ref_lse).abs().max() < 1e-6 * ref_lse.abs().max() + 1e-6
    assert (lp.double() - ref_lp).abs().max() < 1e-6 * ref_lp.abs().max()


def test_only_one_gradient(gen):
    hidden, weight, targets, up = inputs(gen, 21, 8, 300, torch.float32)
    _, _, ref_gh, ref_gw = oracle(hidden, weight, targets, up)
    _, lse = native.forward(hidden, weight, targets)
    gh, gw = native.backward(up.float(), hidden, weight, targets, lse, True, False)
    assert gw is None and rel(gh, ref_gh) < 1e-5
    gh, gw = native.backward(up.float(), hidden, weight, targets, lse, False, True)
    assert gh is None and rel(gw, ref_gw) < 1e-5


def test_empty_tokens():
    lp, lse = native.forward(torch.zeros(0, 8), torch.randn(11, 8), torch.zeros(0, dtype=torch.long))
    assert lp.shape == lse.shape == (0,)
    gh, gw = native.backward(torch.zeros(0), torch.zeros(0, 8), torch.randn(11, 8),
                             torch.zeros(0, dtype=torch.long), lse)
    assert gh.shape == (0, 8) and torch.equal(gw, torch.zeros(11, 8))


def test_nan_propagates(gen):
    """A NaN input must show up in the outputs, not be swallowed by a max or an exp."""
    hidden, weight, targets, up = inputs(gen, 9, 8, 300, torch.float32)
    hidden[3, 2] = float("nan")
    lp, lse = native.forward(hidden, weight, targets)
    assert torch.isnan(lp[3]) and torch.isnan(lse[3])
    assert torch.isfinite(lp[torch.arange(9) != 3]).all()
    gh, gw = native.backward(up.float(), hidden, weight, targets, lse)
    assert torch.isnan(gh[3]).any() and torch.isnan(gw).any()


def test_rejects_bad_targets():
    with pytest.raises(RuntimeError, match="out of range"):
        native.forward(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1]))


def test_requires_grad_inputs_work(gen):
    """Called on leaf tensors that require grad (as a custom op would see them under autograd)."""
    hidden, weight, targets, up = inputs(gen, 17, 8, 300, torch.float32)
    ref_lp = oracle(hidden, weight, targets, up)[0]
    lp, _ = native.forward(hidden.requires_grad_(), weight.requires_grad_(), targets)
    assert rel(lp, ref_lp) < 1e-5


def test_cached_build_loads_without_tools(tmp_path, monkeypatch, gen):
    """A finished build is imported as it is (no compiler, ninja or rebuild check: processes whose
    PATH finds another ninja version must not rebuild it); an empty build folder without tools
    is unavailable with the reason."""
    import shutil

    built = native.cache_dir()
    monkeypatch.setattr(native, "_missing_tools", lambda: "no C++ compiler ('c++' not on PATH)")
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: pytest.fail("rebuilt"))
    copy = tmp_path / "built"
    copy.mkdir()
    for name in (native.NAME + ".so", native.BUILT):
        shutil.copy(f"{built}/{name}", copy / name)
    mod = native._build(str(copy))
    hidden, weight, targets, _ = inputs(gen, 9, 8, 300, torch.float32)
    lp, _ = mod.forward(hidden, weight, targets, 0, None, 1.0, 0.0, 1)
    ref_lp = oracle(hidden, weight, targets, torch.ones(9))[0]
    assert rel(lp, ref_lp) < 1e-5
    (tmp_path / "empty").mkdir()
    with pytest.raises(native._Unavailable, match="no C\\+\\+ compiler"):
        native._build(str(tmp_path / "empty"))
