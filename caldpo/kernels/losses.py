"""Per-pair preference losses: SFT, DPO, IPO and Cal-DPO.

Inputs are per-sequence summed log-probs ([P] each). With h_w = policy_chosen
- ref_chosen, h_l = policy_rejected - ref_rejected and the preference logit
u = h_w - h_l:

- sft:     -policy_chosen
- dpo:     -(1-ls) logsigmoid(beta u) - ls logsigmoid(-beta u)
- ipo:     (u - 1/(2 beta))^2
- caldpo:  -logsigmoid(u) + cw ((h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2)
  (no beta inside the sigmoid, as in the reference Pythia code; cw is the
  calibration weight, 1.0 there and 0.5 in the authors' later code)
- cal_dpo: the authors' loss with their ``shift`` s (default 0.5):
  s != 0: -logsigmoid(u) + (h_w - (1-s)/beta)^2 + (h_l + s/beta)^2;
  s == 0: their plain DPO, -logsigmoid(beta u).
  s = 0.5 is caldpo with cw = 1.

``reference_free=True`` (dpo, ipo, caldpo, cal_dpo) drops the reference from the
preference logit only, u = policy_chosen - policy_rejected, as the authors'
``preference_loss`` (``ref_logratios = 0``; the same in the DPO repository it forks):
the calibration terms and the rewards keep h = log pi - log pi_ref, so the
reference log-probs are still required.

Rewards are beta * h, detached. For sft the reference arguments may be None:
a reward is beta * (policy - ref) when both of its log-probs are given, else
zeros, so SFT runs can still log the same metrics when a reference exists.

Backends: "torch"/"auto" (eager, computed in fp32), "reference" (fp64, for
checking), "compiled" (the same function under torch.compile: one fused
elementwise kernel for losses and gradients on GPU; "triton" is an alias).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

LOSSES = ("sft", "dpo", "ipo", "caldpo", "cal_dpo")
_OPTIONS = {"label_smoothing": ("dpo", 0.0), "calibration_weight": ("caldpo", 1.0), "shift": ("cal_dpo", 0.5)}


def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, reference_free: bool = False) -> torch.Tensor:
    """The preference logit u[P] = (pi_w - pi_l) - (ref_w - ref_l); with ``reference_free``
    u = pi_w - pi_l (the authors' ``ref_logratios = 0``). Inputs: summed log-probs [P]."""
    if reference_free:
        return policy_chosen - policy_rejected
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def calibrated_terms(h_w: torch.Tensor, h_l: torch.Tensor, beta: float, shift: float = 0.5,
                     logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cal-DPO's two parts -> (preference[P], calibration[P]), unweighted.

    preference = -logsigmoid(u) with u = ``logits`` (``preference_logits``; default h_w - h_l);
    calibration = (h_w - (1-s)/beta)^2 + (h_l + s/beta)^2 with s = ``shift`` (0.5: the targets
    +-1/(2 beta) of the reference Pythia code). The one owner of the formula: the losses and the
    logged ``loss/preference``/``loss/calibration`` both come from here.
    """
    preference = -F.logsigmoid(h_w - h_l if logits is None else logits)
    target_w, target_l = calibration_targets(beta, shift)
    calibration = (h_w - target_w) ** 2 + (h_l - target_l) ** 2
    return preference, calibration


def calibration_targets(beta: float, shift: float = 0.5) -> tuple[float, float]:
    """Cal-DPO's targets (t_w, t_l) = ((1-s)/beta, -s/beta) for h_w and h_l (s = 0.5: +-1/(2 beta))."""
    return (1.0 - shift) / beta, -shift / beta


def _pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                 beta: float, loss: str, label_smoothing: float, calibration_weight: float, shift: float,
                 reference_free: bool = False):
    """The loss formulas on already-cast tensors -> (losses, h_w, h_l)."""
    if loss == "sft":
        return -policy_chosen, None, None
    h_w = policy_chosen - ref_chosen
    h_l = policy_rejected - ref_rejected
    u = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, reference_free)
    if loss == "dpo" or (loss == "cal_dpo" and shift == 0.0):
        z = beta * u
        out = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss == "ipo":
        out = (u - 1.0 / (2.0 * beta)) ** 2
    elif loss == "cal_dpo":
        preference, calibration = calibrated_terms(h_w, h_l, beta, shift, logits=u)
        out = preference + calibration
    else:  # caldpo
        preference, calibration = calibrated_terms(h_w, h_l, beta, 0.5, logits=u)
        out = preference + calibration_weight * calibration
    return out, h_w, h_l


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_pair_losses, dynamic=True)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor | None,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    beta: float, loss: str = "caldpo", backend: str = "auto", reference_free: bool = False,
                    **loss_options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and detached rewards -> (losses[P], chosen_rewards[P], rejected_rewards[P]).

    Options: label_smoothing (dpo only, default 0.0), calibration_weight
    (caldpo only, default 1.0), shift (cal_dpo only, default 0.5, in [0, 1]). An
    option given for a loss that does not use it must keep its default.
    ``reference_free`` (every loss but sft): the reference leaves the preference logit
    only (module docstring); rewards and calibration terms still use it. Outputs are
    float32 (float64 for "reference"). Raises ValueError / TypeError for a bad loss,
    option, beta or backend.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    opts = {}
    for name, value in loss_options.items():
        if name not in _OPTIONS:
            raise TypeError(f"unknown loss option {name!r}; expected one of {tuple(_OPTIONS)}")
        owner, default = _OPTIONS[name]
        if owner != loss and float(value) != default:
            raise ValueError(f"option {name}={value} only applies to loss={owner!r}, not {loss!r}")
        opts[name] = float(value)
    ls = opts.get("label_smoothing", 0.0)
    cw = opts.get("calibration_weight", 1.0)
    shift = opts.get("shift", 0.5)
    if not 0.0 <= shift <= 1.0:
        raise ValueError(f"shift must be in [0, 1], got {shift}")
    if loss != "sft" and beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if reference_free and loss == "sft":
        raise ValueError("reference_free applies to the preference losses, not loss='sft'")
    if loss != "sft" and any(x is None for x in (policy_rejected, ref_chosen, ref_rejected)):
        raise ValueError(f"loss={loss!r} needs policy_rejected, ref_chosen and ref_rejected")
    if backend not in ("auto", "torch", "reference", "compiled", "triton"):
        raise ValueError(f"unknown preference_loss backend {backend!r}")

    dtype = torch.float64 if backend == "reference" else torch.float32
    cast = [None if x is None else x.to(dtype) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    fn = _compiled() if backend in ("compiled", "triton") else _pair_losses
    losses, h_w, h_l = fn(*cast, float(beta), loss, ls, cw, shift, bool(reference_free))

    pc, pr, rc, rr = cast
    if loss == "sft":
        h_w = pc - rc if rc is not None else None
        h_l = pr - rr if pr is not None and rr is not None else None
    zeros = torch.zeros_like(pc)
    chosen = (beta * h_w).detach() if h_w is not None else zeros
    rejected = (beta * h_l).detach() if h_l is not None else zeros
    return losses, chosen, rejected
