"""sequence_logprobs: Hugging Face shift semantics against a hand-written float64 loop."""
import math

import pytest
import torch

from caldpo.kernels import sequence_logprobs

from .conftest import rel_err


def loop_oracle(hidden, weight, labels, average):
    """Token by token: position t scores labels[t+1] unless it is -100; float64 throughout."""
    out = []
    for b in range(hidden.shape[0]):
        total, count = hidden.new_zeros((), dtype=torch.float64), 0
        for t in range(hidden.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            logits = weight.double() @ hidden[b, t].double()
            total = total + logits[y] - torch.logsumexp(logits, 0)
            count += 1
        out.append(total / count if average and count else total)
    return torch.stack(out)


def make_batch(gen, b, t, h, v, dtype):
    hidden = torch.randn(b, t, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=gen)
    for i in range(b):  # prompt prefix masked, then response, then right padding
        p = int(torch.randint(0, t // 2, (1,), generator=gen))
        pad = int(torch.randint(0, t // 3, (1,), generator=gen))
        labels[i, :p] = -100
        labels[i, t - pad:] = -100
    labels[-1] = -100  # one sequence with nothing to score
    return hidden, weight, labels


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_loop(gen, backend, average, dtype):
    hidden, weight, labels = make_batch(gen, 4, 13, 16, 37, dtype)
    gseq = torch.randn(4, generator=gen, dtype=torch.float64)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = loop_oracle(h64, w64, labels, average)
    ref_gh, ref_gw = torch.autograd.grad((ref * gseq).sum(), (h64, w64))

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = sequence_logprobs(h, w, labels, average_log_prob=average, backend=backend)
    assert out.shape == (4,) and out.dtype == torch.float32
    out.backward(gseq.float())
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < limit
    assert rel_err(h.grad, ref_gh) < limit and rel_err(w.grad, ref_gw) < limit
    assert out[-1].item() == 0.0  # all-ignored sequence: 0, not NaN
    assert (h.grad[:, -1] == 0).all()  # last position predicts nothing


def test_hand_computed_shift():
    """Two-token vocab, H=1: every log-prob is a closed form computed with math."""
    weight = torch.tensor([[1.0], [-1.0]])
    hidden = torch.tensor([[[0.5], [2.0], [-1.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    # position 0 (x=0.5) scores label 1; position 1 (x=2.0) scores label 0
    lp = lambda x, y: (x if y == 0 else -x) - math.log(math.exp(x) + math.exp(-x))
    expected = lp(0.5, 1) + lp(2.0, 0)
    out = sequence_logprobs(hidden, weight, labels, backend="torch")
    assert abs(out.item() - expected) < 1e-6
    mean = sequence_logprobs(hidden, weight, labels, average_log_prob=True, backend="torch")
    assert abs(mean.item() - expected / 2) < 1e-6


def test_compiled_caller_matches(gen):
    """torch.compile of a loss that calls sequence_logprobs runs and matches eager on CPU."""
    hidden, weight, labels = make_batch(gen, 3, 9, 8, 37, torch.float32)

    def f(h, w):
        lp = sequence_logprobs(h * 1.5, w, labels, backend="torch")
        return (lp[0] - lp[1]).square() + lp.sum()

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    f(h1, w1).backward()
    out = torch.compile(f)(h2, w2)
    out.backward()
    # The two terms nearly cancel (|out| can be 10x smaller than either), so fp32 reordering by the
    # compiler is bounded relative to the terms' magnitudes, not to the result's.
    lp = sequence_logprobs(hidden * 1.5, weight, labels, backend="torch").double()
    scale = float((lp[0] - lp[1]).square() + lp.abs().sum())
    assert abs(out.item() - f(hidden, weight).item()) < 1e-6 * scale
    assert rel_err(h2.grad, h1.grad) < 1e-5 and rel_err(w2.grad, w1.grad) < 1e-5
