"""Per-pair preference losses: SFT, DPO, IPO and Cal-DPO.

Inputs are per-sequence summed log-probs ([P] each). With h_w = policy_chosen
- ref_chosen and h_l = policy_rejected - ref_rejected:

- sft:     -policy_chosen
- dpo:     -(1-ls) logsigmoid(beta (h_w-h_l)) - ls logsigmoid(-beta (h_w-h_l))
- ipo:     (h_w - h_l - 1/(2 beta))^2
- caldpo:  -logsigmoid(h_w - h_l) + cw ((h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2)
  (no beta inside the sigmoid, as in the reference Pythia code; cw is the
  calibration weight, 1.0 there and 0.5 in the authors' later code)
- cal_dpo: the authors' loss with their ``shift`` s (default 0.5):
  s != 0: -logsigmoid(h_w - h_l) + (h_w - (1-s)/beta)^2 + (h_l + s/beta)^2;
  s == 0: their plain DPO, -logsigmoid(beta (h_w - h_l)).
  s = 0.5 is caldpo with cw = 1.

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


def calibrated_terms(h_w: torch.Tensor, h_l: torch.Tensor, beta: float, shift: float = 0.5
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cal-DPO's two parts -> (preference[P], calibration[P]), unweighted.

    preference = -logsigmoid(h_w - h_l); calibration = (h_w - (1-s)/beta)^2 + (h_l + s/beta)^2
    with s = ``shift`` (0.5: the targets +-1/(2 beta) of the reference Pythia code). The one
    owner of the formula: the losses and the logged ``loss/preference``/``loss/calibration``
    both come from here.
    """
    preference = -F.logsigmoid(h_w - h_l)
    target_w, target_l = calibration_targets(beta, shift)
    calibration = (h_w - target_w) ** 2 + (h_l - target_l) ** 2
    return preference, calibration


def calibration_targets(beta: float, shift: float = 0.5) -> tuple[float, float]:
    """Cal-DPO's targets (t_w, t_l) = ((1-s)/beta, -s/beta) for h_w and h_l (s = 0.5: +-1/(2 beta))."""
    return (1.0 - shift) / beta, -shift / beta


def _pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                 beta: float, loss: str, label_smoothing: float, calibration_weight: float, shift: float):
    """The loss formulas on already-cast tensors -> (losses, h_w, h_l)."""
    if loss == "sft":
        return -policy_chosen, None, None
    h_w = policy_chosen - ref_chosen
    h_l = policy_rejected - ref_rejected
    if loss == "dpo" or (loss == "cal_dpo" and shift == 0.0):
        z = beta * (h_w - h_l)
        out = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss == "ipo":
        out = (h_w - h_l - 1.0 / (2.0 * beta)) ** 2
    elif loss == "cal_dpo":
        preference, calibration = calibrated_terms(h_w, h_l, beta, shift)
        out = preference + calibration
    else:  # caldpo
        preference, calibration = calibrated_terms(h_w, h_l, beta, 0.5)
        out = preference + calibration_weight * calibration
    return out, h_w, h_l


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_pair_losses, dynamic=True)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor | None,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    beta: float, loss: str = "caldpo", backend: str = "auto", **loss_options
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and detached rewards -> (losses[P], chosen_rewards[P], rejected_rewards[P]).

    Options: label_smoothing (dpo only, default 0.0), calibration_weight
    (caldpo only, default 1.0), shift (cal_dpo only, default 0.5, in [0, 1]). An
    option given for a loss that does not use it must keep its default. Outputs are
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
    if loss != "sft" and any(x is None for x in (policy_rejected, ref_chosen, ref_rejected)):
        raise ValueError(f"loss={loss!r} needs policy_rejected, ref_chosen and ref_rejected")
    if backend not in ("auto", "torch", "reference", "compiled", "triton"):
        raise ValueError(f"unknown preference_loss backend {backend!r}")

    dtype = torch.float64 if backend == "reference" else torch.float32
    cast = [None if x is None else x.to(dtype) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    fn = _compiled() if backend in ("compiled", "triton") else _pair_losses
    losses, h_w, h_l = fn(*cast, float(beta), loss, ls, cw, shift)

    pc, pr, rc, rr = cast
    if loss == "sft":
        h_w = pc - rc if rc is not None else None
        h_l = pr - rr if pr is not None and rr is not None else None
    zeros = torch.zeros_like(pc)
    chosen = (beta * h_w).detach() if h_w is not None else zeros
    rejected = (beta * h_l).detach() if h_l is not None else zeros
    return losses, chosen, rejected
