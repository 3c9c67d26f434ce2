"""linear_logprobs against an independent float64 oracle: values, both gradients, edge cases."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caldpo.kernels import KernelOptions, available_backends, linear_logprobs, resolve_backend
from caldpo.kernels import chunked

from .conftest import make_inputs, oracle_logprobs, rel_err, tol

BACKENDS = ["reference", "torch"]
try:
    from caldpo.kernels import native as _native
    if _native.available():
        BACKENDS.append("native")
except ImportError:
    pass
SHAPES = [(37, 16, 131), (64, 32, 37), (5, 8, 1000), (1, 4, 3)]


def check(hidden, weight, targets, backend, gen, atol_dtype=None, options=None):
    """Run backend and oracle with the same random upstream grad; compare all three results."""
    dtype = atol_dtype or hidden.dtype
    g = torch.randn(hidden.shape[0], generator=gen, dtype=torch.float64)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = oracle_logprobs(h64, w64, targets)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h64, w64))

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = linear_logprobs(h, w, targets, backend=backend, options=options)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    out.backward(g.float())
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    for got in (out, h.grad, w.grad):
        assert torch.isfinite(got).all()
    assert rel_err(out, ref) < tol(dtype)
    assert rel_err(h.grad, ref_gh) < tol(dtype)
    assert rel_err(w.grad, ref_gw) < tol(dtype)
    assert (out[targets == -100] == 0).all()
    assert (h.grad[targets == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle(gen, backend, shape, dtype):
    check(*make_inputs(gen, *shape, dtype), backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_large_logits(gen, backend, scale):
    check(*make_inputs(gen, 33, 16, 131, torch.float32, scale=scale), backend, gen)


def test_fp16_inputs(gen):
    check(*make_inputs(gen, 29, 16, 131, torch.float16), "torch", gen)


@pytest.mark.parametrize("axis", ["vocab", "tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_ragged_chunks(gen, axis, dtype):
    """Force 7-row chunks on each axis so every boundary and a ragged last chunk are exercised."""
    n, v = 100, 131
    opts = KernelOptions(axis=axis, block_bytes=7 * 4 * (v if axis == "tokens" else n), min_block=1)
    assert chunked.chunk_size(v if axis == "vocab" else n, n if axis == "vocab" else v, options=opts) == 7
    check(*make_inputs(gen, n, 16, v, dtype), "torch", gen, options=opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.full((6,), -100)
    out = linear_logprobs(h, w, t, backend=backend)
    assert torch.equal(out, torch.zeros(6))
    out.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_custom_ignore_index(gen):
    hidden, weight, targets = make_inputs(gen, 20, 8, 37, torch.float32, ignore_frac=0.0)
    targets[::4] = 0
    out = linear_logprobs(hidden, weight, targets, ignore_index=0, backend="torch")
    ref = oracle_logprobs(hidden, weight, targets, ignore_index=0)
    assert rel_err(out, ref) < 1e-5 and (out[::4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding(gen, backend):
    """Weight used both as input embedding and output head: gradients from both uses add up."""
    v, d, n = 41, 12, 30
    emb64 = torch.randn(v, d, generator=gen, dtype=torch.float64).requires_grad_()
    mix64 = torch.randn(d, d, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, v, (n,), generator=gen)
    tgt = torch.randint(0, v, (n,), generator=gen)
    tgt[::5] = -100
    ref = oracle_logprobs(torch.tanh(emb64[ids] @ mix64), emb64, tgt)
    (ref_g,) = torch.autograd.grad(ref.sum(), emb64)

    emb = emb64.detach().float().requires_grad_()
    out = linear_logprobs(torch.tanh(emb[ids] @ mix64.float()), emb, tgt, backend=backend)
    out.sum().backward()
    assert rel_err(out, ref) < 1e-5 and rel_err(emb.grad, ref_g) < 1e-5


def test_grad_accumulates_into_existing(gen):
    hidden, weight, targets = make_inputs(gen, 17, 8, 37, torch.float32)
    w = weight.clone().requires_grad_()
    w.grad = torch.ones_like(w)
    linear_logprobs(hidden, w, targets, backend="torch").sum().backward()
    w64 = weight.double().requires_grad_()
    (ref,) = torch.autograd.grad(oracle_logprobs(hidden.double(), w64, targets).sum(), w64)
    assert rel_err(w.grad, ref + 1) < 1e-5


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_one_side_frozen(gen, frozen):
    hidden, weight, targets = make_inputs(gen, 19, 8, 37, torch.float32)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    linear_logprobs(h, w, targets, backend="torch").sum().backward()
    live = w if frozen == "hidden" else h
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = torch.autograd.grad(oracle_logprobs(h64, w64, targets).sum(), (h64, w64))
    assert rel_err(live.grad, ref[1] if frozen == "hidden" else ref[0]) < 1e-5
    assert (h.grad if frozen == "hidden" else w.grad) is None


def test_uninitialised_memory_is_poisoned(gen):
    """With PyTorch filling every torch.empty with NaN, no NaN may reach outputs or grads."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all()
        check(*make_inputs(gen, 45, 16, 131, torch.float32), "torch", gen)
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


class _MaxAlloc(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("n,v", [(1024, 1000), (800, 1024)])
def test_torch_backend_never_allocates_full_logits(gen, n, v):
    opts = KernelOptions(block_bytes=64 * 4 * 1024, min_block=1)
    h = 8
    hidden, weight, targets = make_inputs(gen, n, h, v, torch.float32, ignore_frac=0.0)
    with _MaxAlloc() as mode:
        _, lse = chunked.forward(hidden, weight, targets, options=opts)
        chunked.backward(torch.ones(n), hidden, weight, targets, lse, options=opts)
    assert mode.largest <= 64 * 1024 < n * v


def test_torch_compile_matches(gen):
    hidden, weight, targets = make_inputs(gen, 24, 8, 37, torch.float32)

    def f(h, w):
        return linear_logprobs(torch.tanh(h), w, targets, backend="torch").sum()

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = f(h1, w1)
    eager.backward()
    compiled = torch.compile(f, fullgraph=True)(h2, w2)
    compiled.backward()
    assert rel_err(compiled, eager) < 1e-5
    assert rel_err(h2.grad, h1.grad) < 1e-5 and rel_err(w2.grad, w1.grad) < 1e-5


def test_backend_policy():
    # auto on CPU: the native extension when it builds, else the torch path (tests/test_kernels/test_options.py)
    assert resolve_backend("auto", "cpu") == ("native" if "native" in BACKENDS else "torch")
    assert resolve_backend("reference", "cpu") == "reference"
    assert {"reference", "torch"} <= set(available_backends("cpu"))
    with pytest.raises(ValueError):
        resolve_backend("fastest", "cpu")


def test_shape_errors():
    with pytest.raises(ValueError):
        linear_logprobs(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))



@pytest.mark.parametrize("ignore_frac", [0.0, 0.4])
def test_one_compaction_per_forward_none_in_backward(gen, monkeypatch, ignore_frac):
    """Forward finds the kept tokens with one nonzero (its only host sync) and then reads the
    target-range flag, which by then lies in host memory (pinned, on CUDA: see logprobs._kept;
    test_cuda.py counts the syncs there); backward reuses the saved index and reads nothing
    back to the host."""
    calls = []
    for name in ("nonzero", "item", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    hidden, weight, targets = make_inputs(gen, 40, 8, 37, torch.float32, ignore_frac=ignore_frac)
    h = hidden.clone().requires_grad_()
    out = linear_logprobs(h, weight.clone().requires_grad_(), targets, backend="torch")
    assert calls == ["nonzero", "__bool__"], calls
    calls.clear()
    out.sum().backward()
    assert calls == [], calls
    monkeypatch.undo()
    ref = oracle_logprobs(hidden.double(), weight.double(), targets)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("axis", ["vocab", "tokens"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need", [("h", "w"), ("h",), ("w",)])
@pytest.mark.parametrize("fp32_weight", [False, True], ids=["same", "fp32weight"])
def test_16bit_gemm_rule(gen, axis, dtype, need, fp32_weight):
    """The CUDA rule (16-bit GEMM operands, fp32 results) run on CPU, across ragged chunks;
    an fp32 weight with 16-bit hidden states gets its gradient in fp32."""
    n, v = 90, 131
    opts = KernelOptions(gemm="input", axis=axis, block_bytes=11 * 4 * (v if axis == "tokens" else n),
                         min_block=1)
    hidden, weight, targets = make_inputs(gen, n, 16, v, dtype)
    if fp32_weight:
        weight = weight.float()
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = oracle_logprobs(h64, w64, targets)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h64, w64))
    h = hidden.clone().requires_grad_("h" in need)
    w = weight.clone().requires_grad_("w" in need)
    out = linear_logprobs(h, w, targets, backend="torch", options=opts)
    out.backward(g.float())
    assert rel_err(out, ref) < tol(dtype)
    if "h" in need:
        assert h.grad.dtype == dtype and rel_err(h.grad, ref_gh) < tol(dtype)
        assert (h.grad[targets == -100] == 0).all()
    if "w" in need:
        assert w.grad.dtype == weight.dtype and rel_err(w.grad, ref_gw) < tol(dtype)


@pytest.mark.parametrize("rows", [8088, 8352, 8768, 1000, 300, 77])
def test_cuda_chunk_widths_are_aligned(rows):
    """On CUDA a vocab chunk's width is a multiple of 128 columns (or the whole, smaller vocab),
    so every GEMM operand built from it has 16-byte aligned rows."""
    for v in (50304, 32000, 200):
        w = chunked.chunk_size(v, rows, cuda=True)
        assert 1 <= w <= v and (w % chunked.CUDA_ALIGN == 0 or w == v)
    assert chunked.chunk_size(50304, 8352, cuda=False) == chunked.chunk_size(50304, 8352)
    assert [chunked.aligned_rows(m) for m in (1, 16, 17, 8166)] == [16, 16, 32, 8176]
