"""preference_loss against hand-computed numbers and independent float64 formulas."""
import math

import pytest
import torch

from caldpo.kernels import preference_loss

from .conftest import rel_err


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_caldpo_by_hand():
    pc, pr, rc, rr, beta = -10.0, -12.5, -11.0, -12.0, 0.1
    h_w, h_l = pc - rc, pr - rr  # 1.0, -0.5
    expected = -logsig(h_w - h_l) + (h_w - 5.0) ** 2 + (h_l + 5.0) ** 2  # log(1+e^-1.5) + 36.25
    assert abs(expected - (math.log(1 + math.exp(-1.5)) + 36.25)) < 1e-12
    t = lambda x: torch.tensor([x])
    loss, cr, rj = preference_loss(t(pc), t(pr), t(rc), t(rr), beta, loss="caldpo")
    assert abs(loss.item() - expected) < 1e-5
    assert abs(cr.item() - 0.1) < 1e-6 and abs(rj.item() + 0.05) < 1e-6
    half, _, _ = preference_loss(t(pc), t(pr), t(rc), t(rr), beta, loss="caldpo", calibration_weight=0.5)
    assert abs(half.item() - (-logsig(1.5) + 0.5 * 36.25)) < 1e-5


def test_dpo_ipo_sft_by_hand():
    t = lambda x: torch.tensor([x])
    args = (t(-3.0), t(-4.0), t(-3.5), t(-3.0))  # h_w = 0.5, h_l = -1.0
    dpo, _, _ = preference_loss(*args, 0.5, loss="dpo")
    assert abs(dpo.item() + logsig(0.75)) < 1e-6
    ls, _, _ = preference_loss(*args, 0.5, loss="dpo", label_smoothing=0.2)
    assert abs(ls.item() - (-0.8 * logsig(0.75) - 0.2 * logsig(-0.75))) < 1e-6
    ipo, _, _ = preference_loss(*args, 0.5, loss="ipo")
    assert abs(ipo.item() - (1.5 - 1.0) ** 2) < 1e-6
    sft, c, r = preference_loss(t(-3.0), None, None, None, 0.5, loss="sft")
    assert sft.item() == 3.0 and c.item() == 0.0 and r.item() == 0.0
    _, c, r = preference_loss(*args, 0.5, loss="sft")
    assert abs(c.item() - 0.25) < 1e-6 and abs(r.item() + 0.5) < 1e-6


def formula64(pc, pr, rc, rr, beta, loss, ls=0.0, cw=1.0, shift=0.5):
    """Independent float64 formulas, written without torch.nn.functional."""
    h_w, h_l = pc - rc, pr - rr
    lsg = lambda x: -torch.log1p(torch.exp(-x.abs())) + torch.clamp(x, max=0)
    if loss == "sft":
        return -pc
    if loss == "dpo":
        z = beta * (h_w - h_l)
        return -(1 - ls) * lsg(z) - ls * lsg(-z)
    if loss == "ipo":
        return (h_w - h_l - 1 / (2 * beta)) ** 2
    if loss == "cal_dpo":  # the authors' code: plain DPO at shift 0, else shifted calibration targets
        if shift == 0:
            return -lsg(beta * (h_w - h_l))
        return -lsg(h_w - h_l) + (h_w - (1 - shift) / beta) ** 2 + (h_l + shift / beta) ** 2
    return -lsg(h_w - h_l) + cw * ((h_w - 1 / (2 * beta)) ** 2 + (h_l + 1 / (2 * beta)) ** 2)


CASES = [("sft", {}), ("dpo", {}), ("dpo", {"label_smoothing": 0.1}), ("ipo", {}),
         ("caldpo", {}), ("caldpo", {"calibration_weight": 0.5}),
         ("cal_dpo", {}), ("cal_dpo", {"shift": 0.0}), ("cal_dpo", {"shift": 0.3}), ("cal_dpo", {"shift": 1.0})]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("loss,opts", CASES)
def test_random_against_formula(gen, backend, loss, opts):
    p = 33
    base = [torch.randn(p, generator=gen, dtype=torch.float64) * 20 - 100 for _ in range(4)]
    beta = float(torch.rand(1, generator=gen)) * 0.5 + 0.01
    g = torch.randn(p, generator=gen, dtype=torch.float64)
    x64 = [b.clone().requires_grad_() for b in base]
    ref = formula64(*x64, beta, loss, opts.get("label_smoothing", 0.0), opts.get("calibration_weight", 1.0),
                    opts.get("shift", 0.5))
    ref_grads = torch.autograd.grad((ref * g).sum(), x64, allow_unused=True)

    x = [b.float().requires_grad_() for b in base]
    losses, chosen, rejected = preference_loss(*x, beta, loss=loss, backend=backend, **opts)
    assert losses.shape == chosen.shape == rejected.shape == (p,)
    assert not chosen.requires_grad and not rejected.requires_grad
    assert rel_err(chosen, beta * (base[0] - base[2])) < 1e-6
    assert rel_err(rejected, beta * (base[1] - base[3])) < 1e-6
    assert rel_err(losses, ref) < 1e-5
    (losses * g.to(losses.dtype)).sum().backward()
    for got, want in zip(x, ref_grads):
        if want is None:
            assert got.grad is None or torch.count_nonzero(got.grad) == 0
        else:
            assert torch.isfinite(got.grad).all() and rel_err(got.grad, want) < 1e-5


@pytest.mark.parametrize("beta", [0.001, 0.1, 2.0])
@pytest.mark.parametrize("shift", [0.0, 0.1, 0.5, 0.9])
def test_cal_dpo_shift_by_hand(beta, shift):
    """loss=cal_dpo for several shifts and betas, one pair computed with floats by hand."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)
    h_w, h_l = 0.7, -0.4
    if shift == 0:
        want = -logsig(beta * (h_w - h_l))
    else:
        want = -logsig(h_w - h_l) + (h_w - (1 - shift) / beta) ** 2 + (h_l + shift / beta) ** 2
    got, c, r = preference_loss(t(h_w - 5.0), t(h_l - 7.0), t(-5.0), t(-7.0), beta, loss="cal_dpo", shift=shift,
                                backend="reference")
    assert abs(got.item() - want) <= 1e-9 * max(1.0, abs(want))
    assert abs(c.item() - beta * h_w) < 1e-12 and abs(r.item() - beta * h_l) < 1e-12


def test_cal_dpo_half_shift_is_caldpo(gen):
    x = [torch.randn(8, generator=gen) for _ in range(4)]
    a, _, _ = preference_loss(*x, 0.25, loss="cal_dpo", shift=0.5)
    b, _, _ = preference_loss(*x, 0.25, loss="caldpo")
    assert rel_err(a, b) < 1e-6
    with pytest.raises(ValueError):
        preference_loss(*x, 0.25, loss="cal_dpo", shift=1.5)
    with pytest.raises(ValueError):
        preference_loss(*x, 0.25, loss="caldpo", shift=0.3)


def test_caldpo_gradient_closed_form(gen):
    """d loss / d policy_chosen = -(1 - sigmoid(h_w - h_l)) + 2 cw (h_w - 1/(2 beta))."""
    pc, pr, rc, rr = (torch.randn(9, generator=gen, dtype=torch.float64) for _ in range(4))
    beta, cw = 0.2, 0.5
    x = pc.float().requires_grad_()
    losses, _, _ = preference_loss(x, pr.float(), rc.float(), rr.float(), beta, calibration_weight=cw)
    losses.sum().backward()
    h_w, h_l = pc - rc, pr - rr
    want = -(1 - torch.sigmoid(h_w - h_l)) + 2 * cw * (h_w - 1 / (2 * beta))
    assert rel_err(x.grad, want) < 1e-5


def test_extreme_margins_finite():
    big = torch.tensor([1e4, -1e4])
    zero = torch.zeros(2)
    for loss in ("dpo", "caldpo"):
        out, _, _ = preference_loss(big, -big, zero, zero, 0.1, loss=loss)
        assert torch.isfinite(out).all()


def test_compiled_matches_eager(gen):
    x = [torch.randn(16, generator=gen) for _ in range(4)]
    eager = preference_loss(*x, 0.1, loss="caldpo")
    fused = preference_loss(*x, 0.1, loss="caldpo", backend="compiled")
    for a, b in zip(eager, fused):
        assert rel_err(b, a) < 1e-6


def test_option_validation():
    x = torch.zeros(2)
    with pytest.raises(TypeError):
        preference_loss(x, x, x, x, 0.1, loss="dpo", smoothing=0.1)
    with pytest.raises(ValueError):
        preference_loss(x, x, x, x, 0.1, loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        preference_loss(x, x, x, x, 0.1, loss="kto")
    with pytest.raises(ValueError):
        preference_loss(x, None, x, x, 0.1, loss="dpo")
    preference_loss(x, x, x, x, 0.1, loss="ipo", label_smoothing=0.0, calibration_weight=1.0)


def authors_reference_free64(pc, pr, rc, rr, beta, loss, ls=0.0, cw=1.0, shift=0.5):
    """The authors' ``preference_loss`` with ``reference_free=True``, written out in float64 from their
    code's rule: the reference log-ratio is set to 0 in the preference logits only; the regularisation
    (calibration) terms and the returned rewards use pi - pi_ref. -> (losses, chosen_rewards, rejected_rewards)."""
    logits = pc - pr  # pi log-ratio minus a zero reference log-ratio
    chosen, rejected = pc - rc, pr - rr
    lsg = lambda x: -torch.log1p(torch.exp(-x.abs())) + torch.clamp(x, max=0)
    if loss == "dpo":
        out = -(1 - ls) * lsg(beta * logits) - ls * lsg(-beta * logits)
    elif loss == "ipo":
        out = (logits - 1 / (2 * beta)) ** 2
    elif loss == "cal_dpo" and shift == 0:
        out = -lsg(beta * logits)
    elif loss == "cal_dpo":
        out = -lsg(logits) + (chosen - (1 - shift) / beta) ** 2 + (rejected - (0 - shift) / beta) ** 2
    else:  # caldpo: shift 0.5, calibration weighted
        out = -lsg(logits) + cw * ((chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2)
    return out, beta * chosen, beta * rejected


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("loss,opts", [c for c in CASES if c[0] != "sft"])
def test_reference_free_against_authors_formula(gen, backend, loss, opts):
    """reference_free drops the reference from the preference logits only: the losses, their gradients
    (the reference log-probs still reach the calibration terms) and the rewards match the written-out rule."""
    p = 33
    base = [torch.randn(p, generator=gen, dtype=torch.float64) * 20 - 100 for _ in range(4)]
    beta = float(torch.rand(1, generator=gen)) * 0.5 + 0.01
    g = torch.randn(p, generator=gen, dtype=torch.float64)
    x64 = [b.clone().requires_grad_() for b in base]
    ref, ref_c, ref_r = authors_reference_free64(*x64, beta, loss, opts.get("label_smoothing", 0.0),
                                                 opts.get("calibration_weight", 1.0), opts.get("shift", 0.5))
    ref_grads = torch.autograd.grad((ref * g).sum(), x64, allow_unused=True)
    x = [b.float().requires_grad_() for b in base]
    losses, chosen, rejected = preference_loss(*x, beta, loss=loss, backend=backend, reference_free=True, **opts)
    assert rel_err(losses, ref) < 1e-5
    assert rel_err(chosen, ref_c) < 1e-6 and rel_err(rejected, ref_r) < 1e-6
    with_ref, _, _ = preference_loss(*x, beta, loss=loss, backend=backend, **opts)
    assert rel_err(with_ref, ref) > 1e-3  # the option changes the objective on these inputs
    (losses * g.to(losses.dtype)).sum().backward()
    calibrated = loss == "caldpo" or (loss == "cal_dpo" and opts.get("shift", 0.5) != 0)
    for i, (got, want) in enumerate(zip(x, ref_grads)):
        if want is None or not calibrated and i >= 2:  # dpo/ipo/shift 0: the loss does not read the reference
            assert got.grad is None or torch.count_nonzero(got.grad) == 0
        else:
            assert torch.isfinite(got.grad).all() and rel_err(got.grad, want) < 1e-5


def test_reference_free_caldpo_by_hand():
    """Cal-DPO, reference-free: the sigmoid sees pi_w - pi_l = 2.5, the calibration h_w = 1, h_l = -0.5."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)
    loss, c, r = preference_loss(t(-10.0), t(-12.5), t(-11.0), t(-12.0), 0.1, loss="caldpo", reference_free=True,
                                 backend="reference")
    assert abs(loss.item() - (math.log1p(math.exp(-2.5)) + 36.25)) < 1e-12
    assert abs(c.item() - 0.1) < 1e-12 and abs(r.item() + 0.05) < 1e-12
    with pytest.raises(ValueError):
        preference_loss(t(-1.0), None, None, None, 0.1, loss="sft", reference_free=True)
