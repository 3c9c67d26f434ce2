"""Triton backend on CPU through the Triton interpreter.

TRITON_INTERPRET=1 must be set before Triton is first imported, so a plain
`pytest tests` run re-runs this file in a subprocess with the variable set
(`test_triton_under_interpreter`); the cases themselves run only there (or
directly: `TRITON_INTERPRET=1 pytest tests/test_kernels/test_triton.py`).
On a CUDA machine without the variable, the cases run on the GPU instead.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caldpo.kernels import KernelOptions, available_backends, linear_logprobs, sequence_logprobs
from caldpo.kernels.backends import triton_interpreting

from .conftest import HEADS, eager_and_compiled, make_head, make_inputs, oracle_logprobs, rel_err, tol
from .test_head import check_head

ON_GPU = torch.cuda.is_available() and not triton_interpreting()
DEVICE = "cuda" if ON_GPU else "cpu"
RUNNABLE = "triton" in available_backends(DEVICE)
cases = pytest.mark.skipif(not RUNNABLE, reason="needs TRITON_INTERPRET=1 (run by the subprocess test) or CUDA")


@pytest.mark.skipif(RUNNABLE or triton_interpreting(), reason="cases run directly")
def test_triton_under_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                           "-k", "not test_triton_under_interpreter"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


def run_case(gen, hidden, weight, targets, grad=None, need=("h", "w"), options=None):
    """Triton result vs float64 oracle; values and the requested gradients."""
    g = torch.randn(hidden.shape[0], generator=gen, dtype=torch.float64) if grad is None else grad
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = oracle_logprobs(h64, w64, targets)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h64, w64))
    h = hidden.to(DEVICE).requires_grad_("h" in need)
    w = weight.to(DEVICE).requires_grad_("w" in need)
    out = linear_logprobs(h, w, targets.to(DEVICE), backend="triton", options=options)
    out.backward(g.float().to(DEVICE))
    limit = tol(hidden.dtype)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < limit
    if "h" in need:
        assert h.grad.dtype == hidden.dtype and torch.isfinite(h.grad).all()
        assert rel_err(h.grad.cpu(), ref_gh) < limit
    if "w" in need:
        assert w.grad.dtype == weight.dtype and torch.isfinite(w.grad).all()
        assert rel_err(w.grad.cpu(), ref_gw) < limit


@pytest.fixture(params=[("fused", "gemm"), ("gemm", "gemm"), ("fused", "fused")], ids=lambda f: "fwd_%s-bwd_%s" % f)
def backward_form(request):
    """The forms for 16-bit inputs (KernelOptions): the fused kernels, or GEMMs into fp32 blocks
    with one Triton pass."""
    return KernelOptions(forward_form=request.param[0], backward_form=request.param[1])


@cases
@pytest.mark.parametrize("shape", [(37, 20, 131), (5, 16, 37), (40, 33, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle(gen, shape, dtype, backward_form):
    run_case(gen, *make_inputs(gen, *shape, dtype), options=backward_form)


@cases
@pytest.mark.parametrize("scale", [30.0, 100.0])
def test_large_logits(gen, scale):
    run_case(gen, *make_inputs(gen, 21, 16, 131, torch.float32, scale=scale))


@cases
def test_zero_grad_tiles_are_skipped_exactly(gen):
    """Rows with zero upstream grad make whole tiles of d zero; skipping them changes nothing."""
    hidden, weight, targets = make_inputs(gen, 40, 16, 37, torch.float32, ignore_frac=0.0)
    g = torch.randn(40, generator=gen, dtype=torch.float64)
    g[:16] = 0
    run_case(gen, hidden, weight, targets, grad=g)


@cases
@pytest.mark.parametrize("need", [("h",), ("w",)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_side_frozen(gen, need, dtype, backward_form):
    run_case(gen, *make_inputs(gen, 19, 16, 37, dtype), need=need, options=backward_form)


@cases
def test_uninitialised_memory_is_poisoned(gen):
    """With every torch.empty filled with NaN, no NaN may reach outputs or grads."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        run_case(gen, *make_inputs(gen, 23, 16, 37, torch.bfloat16))
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


@cases
def test_all_ignored():
    h = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(37, 16, device=DEVICE, requires_grad=True)
    out = linear_logprobs(h, w, torch.full((6,), -100, device=DEVICE), backend="triton")
    out.sum().backward()
    assert (out == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


@cases
def test_sequence_tied_bf16(gen, backward_form):
    """sequence_logprobs through Triton with a weight tied to the input embedding, bf16."""
    v, d, b, t = 37, 16, 3, 11
    emb64 = (torch.randn(v, d, generator=gen, dtype=torch.float64) / 2).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[-1] = -100
    hidden64 = emb64[ids].cos()
    lp = oracle_logprobs(hidden64[:, :-1].reshape(-1, d), emb64, labels[:, 1:].reshape(-1))
    ref = lp.view(b, t - 1).sum(1)
    (ref_g,) = torch.autograd.grad(ref.sum(), emb64)

    emb = emb64.detach().to(DEVICE, torch.bfloat16).requires_grad_()
    out = sequence_logprobs(emb[ids.to(DEVICE)].cos(), emb, labels.to(DEVICE), backend="triton",
                            options=backward_form)
    out.sum().backward()
    assert out[-1].item() == 0.0
    assert rel_err(out.cpu(), ref) < 1e-2 and rel_err(emb.grad.cpu(), ref_g) < 1e-2


@cases
def test_gemm_forms_across_vocab_blocks(gen):
    """The GEMM forms with 16-column vocab blocks (9 of them, the last ragged): the merge and the
    per-block softmax shifts are exercised, not only a single block."""
    from caldpo.kernels import chunked
    opts = KernelOptions(forward_form="gemm", backward_form="gemm", min_block=1, block_bytes=4 * 16 * 40)
    assert chunked.chunk_size(131, 40, options=opts) == 16
    run_case(gen, *make_inputs(gen, 40, 16, 131, torch.bfloat16, ignore_frac=0.0), options=opts)


@cases
def test_compiles_fullgraph(gen, monkeypatch):
    """torch.compile(fullgraph=True) through sequence_logprobs(backend="triton"): resolving the
    backend must not break the graph, and the compiled step equals eager. The availability
    check is made to hold a lock, host work that dynamo cannot trace (as a first import or
    an extension build is)."""
    import threading

    from caldpo.kernels import backends
    lock, real = threading.Lock(), backends.available_backends

    def guarded(device=None):
        with lock:
            return real(device)
    monkeypatch.setattr(backends, "available_backends", guarded)
    torch._dynamo.reset()
    v, d, b, t = 37, 16, 4, 9
    emb = (torch.randn(v, d, generator=gen) / 2).to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, v, (b, t), generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[:, :3] = -100

    def step(e):
        return sequence_logprobs(torch.tanh(e[ids]), e, labels, backend="triton").square().sum()

    (e, ge), (c, gc) = eager_and_compiled(step, emb)
    # On CPU the compiled graph rounds like eager. On CUDA inductor fuses tanh's backward and
    # the embedding's scatter-add in fp32 where eager rounds each to bf16 (an H100 showed
    # 2.1e-3), so the gradient bound there is the bf16 one that test_cuda.py uses.
    assert rel_err(c, e) < 1e-5 and rel_err(gc, ge) < (2e-2 if ON_GPU else 1e-5)


@cases
@pytest.mark.parametrize("spec", HEADS, ids=lambda s: "b%g-s%g-c%s" % s)
def test_head_matches_oracle(gen, spec):
    """Output heads (bias, scale, soft-cap) in the fp32 fused kernels, gradients of all three inputs."""
    hidden, weight, targets = make_inputs(gen, 37, 16, 131, torch.float32, scale=8.0)
    check_head(gen, hidden, weight, targets, make_head(gen, 131, torch.float32, *spec), "triton", device=DEVICE)


@cases
@pytest.mark.parametrize("spec", [(1.0, 0.5, 2.0), (2.0, 1.0, None)], ids=["bias-scale-cap", "bias"])
def test_head_16bit_forms(gen, spec, backward_form):
    """A head through each 16-bit form (fused kernels, GEMM + one Triton pass per block)."""
    hidden, weight, targets = make_inputs(gen, 37, 16, 131, torch.bfloat16, scale=8.0)
    check_head(gen, hidden, weight, targets, make_head(gen, 131, torch.bfloat16, *spec), "triton", device=DEVICE,
               options=backward_form)


@cases
@pytest.mark.parametrize("need", [("b",), ("h",)])
def test_head_partial_grads(gen, need):
    hidden, weight, targets = make_inputs(gen, 19, 16, 37, torch.float32, scale=4.0)
    check_head(gen, hidden, weight, targets, make_head(gen, 37, torch.float32, 1.0, 0.5, 2.0), "triton", need,
               device=DEVICE)


@cases
@pytest.mark.parametrize("bad", [37, -1])
def test_out_of_range_target_raises(bad):
    """A target outside [0, V) (not ignore_index) raises, naming it (it once scored as -logsumexp)."""
    h, w = torch.randn(5, 16, device=DEVICE), torch.randn(37, 16, device=DEVICE)
    t = torch.tensor([1, bad, -100, 3, 4], device=DEVICE)
    with pytest.raises(ValueError, match=rf"\[0, 37\).*first: {bad} at position 1"):
        linear_logprobs(h, w, t, backend="triton")
