"""The per-batch loss step: concatenated chosen+rejected forward, reference log-probs, metrics.

Log-probs are summed over response tokens. Rewards are ``beta * h`` with
``h = log pi - log pi_ref``; accuracy is ``chosen_reward > rejected_reward``.
``loss.reference_free`` drops the reference from the preference logit only (the formulas and
their rule are ``caldpo/kernels/losses.py``'s): the reference still runs, and rewards and
Cal-DPO's calibration terms keep it, as in the authors' trainer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from caldpo.kernels import preference_loss
from caldpo.kernels.losses import calibrated_terms, calibration_targets, preference_logits


def padded_inputs(batch: dict, device: torch.device, sides: tuple[str, ...] = ("chosen", "rejected")
                  ) -> dict[str, torch.Tensor | None]:
    """The model inputs of padded rows: ``sides``' rows stacked (chosen over rejected), right-padded to
    a common length, on ``device`` through pinned non-blocking copies (no host sync).

    Returns ``input_ids``, ``labels`` [B, T] int64; ``attention_mask`` [B, T], or None when every row is
    right-padded (its tokens first: the model then runs without a mask, exact for every scored
    position, see ``model.LogProbModel.forward``); ``kept``: the head's scored positions of the
    flattened shifted targets (``b * T + t`` where labels[b, t + 1] != -100), found on the host so
    that the head needs no ``nonzero`` on the device.
    """
    from .host import to_device
    ids = [batch[f"{s}_input_ids"] for s in sides]
    T = max(x.shape[1] for x in ids)

    def stack(key, value):
        return torch.cat([F.pad(batch[f"{s}_{key}"], (0, T - batch[f"{s}_{key}"].shape[1]), value=value)
                          for s in sides])

    pad_id = int(batch.get("pad_token_id", 0))
    input_ids, mask, labels = stack("input_ids", pad_id), stack("attention_mask", 0), stack("labels", -100)
    lengths = mask.sum(dim=1, keepdim=True)
    right_padded = bool((mask == (torch.arange(T) < lengths)).all())
    scored = F.pad(labels[:, 1:] != -100, (0, 1), value=False).reshape(-1)
    return {"input_ids": to_device(input_ids, device), "labels": to_device(labels, device),
            "attention_mask": None if right_padded else to_device(mask, device),
            "kept": to_device(scored.nonzero().squeeze(1), device)}


def concatenated(batch: dict, device: torch.device) -> dict[str, torch.Tensor | None]:
    """Stack chosen over rejected, right-padded to a common length: one forward for both (``padded_inputs``)."""
    return padded_inputs(batch, device, ("chosen", "rejected"))


def loss_options(cfg: DictConfig) -> dict:
    """The options ``preference_loss`` takes for ``cfg.loss`` (the typed loss group holds exactly these)."""
    if cfg.loss.name == "dpo":
        return {"label_smoothing": cfg.loss.label_smoothing}
    if cfg.loss.name == "caldpo":
        return {"calibration_weight": cfg.loss.calibration_weight}
    if cfg.loss.name == "cal_dpo":
        return {"shift": cfg.loss.shift}
    return {}


def calibration_shift(loss_cfg) -> float | None:
    """Cal-DPO's shift s of a loss config (``caldpo``: 0.5, ``cal_dpo``: ``loss.shift``), None without targets."""
    if loss_cfg.get("name") == "caldpo":
        return 0.5
    if loss_cfg.get("name") == "cal_dpo" and float(loss_cfg.get("shift", 0.5)) != 0:
        return float(loss_cfg.get("shift", 0.5))
    return None


def batch_loss(cfg: DictConfig, policy, reference_logps, batch: dict,
               device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch's pairs and per-pair metric tensors (detached).

    The per-pair loss runs eagerly: it is elementwise over [pairs], negligible next to the
    fused log-prob stage, and eager avoids a compile per new batch shape.

    ``reference_logps(batch, inputs)`` returns (ref_chosen, ref_rejected) or None for SFT;
    ``inputs`` are the policy's model inputs (padded rows, or ``{"packed": PackedBatch}`` when
    ``batch["packed"]`` holds the micro-batch's packed layout), reused by the reference.
    """
    name = cfg.loss.name
    packed = batch.get("packed")  # a layout.PackedBatch when the layout is packed or prefix_shared
    if name == "sft":
        inputs = {"packed": packed.to(device)} if packed is not None else padded_inputs(batch, device, ("chosen",))
        policy_chosen = policy(**inputs)
        losses, _, _ = preference_loss(policy_chosen, None, None, None, 1.0, loss="sft")
        metrics = {"logps/chosen": policy_chosen.detach().float(), "loss": losses.detach().float()}
        return losses.mean(), metrics

    inputs = {"packed": packed.to(device)} if packed is not None else concatenated(batch, device)
    logps = policy(**inputs)
    n = logps.shape[0] // 2  # chosen first, then rejected, in every layout
    policy_chosen, policy_rejected = logps[:n], logps[n:]
    ref_chosen, ref_rejected = reference_logps(batch, inputs)
    beta = cfg.loss.beta
    reference_free = bool(cfg.loss.get("reference_free", False))
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss=name, reference_free=reference_free,
        **loss_options(cfg))
    metrics = {
        "rewards/chosen": chosen_rewards.float(),
        "rewards/rejected": rejected_rewards.float(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": (chosen_rewards - rejected_rewards).float(),
        "logps/chosen": policy_chosen.detach().float(),
        "logps/rejected": policy_rejected.detach().float(),
        "loss": losses.detach().float(),
    }
    # What calibration means, per evaluation: mean h of each side next to its Cal-DPO target
    # (constant columns, present for the losses that have targets), and how often the chosen
    # reward is positive (the paper's claim: DPO drives it below zero, Cal-DPO keeps it above).
    metrics["calibration/h_chosen"] = (policy_chosen - ref_chosen).detach().float()
    metrics["calibration/h_rejected"] = (policy_rejected - ref_rejected).detach().float()
    metrics["rewards/chosen_positive"] = (chosen_rewards > 0).float()
    s = calibration_shift(cfg.loss)
    if s is not None:
        t_w, t_l = calibration_targets(beta, s)
        metrics["calibration/target_chosen"] = torch.full_like(metrics["calibration/h_chosen"], t_w)
        metrics["calibration/target_rejected"] = torch.full_like(metrics["calibration/h_rejected"], t_l)
    if name == "caldpo" or (name == "cal_dpo" and cfg.loss.shift != 0):
        h_w = (policy_chosen - ref_chosen).detach().float()
        h_l = (policy_rejected - ref_rejected).detach().float()
        shift = cfg.loss.shift if name == "cal_dpo" else 0.5
        weight = cfg.loss.calibration_weight if name == "caldpo" else 1.0
        u = preference_logits(policy_chosen.detach().float(), policy_rejected.detach().float(), ref_chosen.float(),
                              ref_rejected.float(), reference_free)
        preference, calibration = calibrated_terms(h_w, h_l, beta, shift, logits=u)
        metrics["loss/preference"] = preference
        metrics["loss/calibration"] = weight * calibration
    return losses.mean(), metrics
