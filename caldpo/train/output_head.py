"""The output head a Hugging Face causal LM applies, and the check that the fused head can run it.

The fused kernels compute ``logits = softcap(scale * (hidden @ weight.T + bias))`` with
``softcap(y) = cap * tanh(y / cap)`` (caldpo/kernels/head.py). `output_head` reads a model's
head into an `OutputHead` from the one table of known transforms below, then *probes* the
model: its own forward, with the backbone replaced by fixed hidden states, must give the same
logits as that formula. A head with anything else between the last hidden state and the logits
(a non-linear projection, a per-token multiplier, a vocabulary slice, a rule missing from the
table) is refused when the model loads, with the measured difference, never trained wrongly.

Known transforms (transformers 5.x ``*ForCausalLM.forward``):

* bias: the output ``nn.Linear``'s bias (Phi, GPT-J, CodeGen, ...), read live at each forward;
* soft-cap: ``final_logit_softcapping`` (Gemma-2/3/4, VaultGemma, NanoChat),
  ``logits_soft_cap`` (RecurrentGemma), ``output_logit_soft_cap`` (xLSTM);
* scale, by ``model_type`` because one config key means different things: Cohere's
  ``logit_scale`` multiplies, Granite's and MiniCPM3's ``logits_scaling`` divides,
  HyperCLOVAX's ``logits_scaling`` multiplies, Falcon-H1's ``lm_head_multiplier`` multiplies.

Tied input/output embeddings need nothing here: the head's weight is the embedding matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caldpo.kernels.head import Head, reference_logits

from .config import ConfigError

SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# model_type -> (config key, True when the logits are divided by it rather than multiplied)
SCALE_RULES = {
    "cohere": ("logit_scale", False), "cohere2": ("logit_scale", False), "cohere2_moe": ("logit_scale", False),
    "granite": ("logits_scaling", True), "granite_swa": ("logits_scaling", True),
    "granitemoe": ("logits_scaling", True), "granitemoeshared": ("logits_scaling", True),
    "granitemoehybrid": ("logits_scaling", True), "granitemoe_swa": ("logits_scaling", True),
    "minicpm3": ("logits_scaling", True), "hyperclovax": ("logits_scaling", False),
    "falcon_h1": ("lm_head_multiplier", False),
}
PROBE_TOKENS = 4
# Per-element tolerance of the probe, in units of the weight dtype's machine epsilon times the
# magnitude of the computation (the model's own head rounds its logits, scale and cap in that dtype).
PROBE_ULPS = 16.0


@dataclass(frozen=True)
class OutputHead:
    """How a model turns its last hidden state into logits, beyond ``hidden @ weight.T``.

    ``bias``: the output layer has a bias (the tensor itself is read from the model at each
    forward, so that under FSDP2 the unsharded parameter is used); ``scale``: constant logit
    factor; ``softcap``: final ``cap * tanh(logits / cap)``, or None.
    """

    bias: bool = False
    scale: float = 1.0
    softcap: float | None = None

    def kwargs(self, lm: nn.Module) -> dict:
        """Keyword arguments for caldpo.kernels.linear_logprobs / sequence_logprobs."""
        bias = lm.get_output_embeddings().bias if self.bias else None
        return {"bias": bias, "scale": self.scale, "softcap": self.softcap}

    def describe(self) -> str:
        parts = (["bias"] if self.bias else []) + ([f"scale {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"softcap {self.softcap:g}"] if self.softcap is not None else [])
        return ", ".join(parts) or "plain"


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _number(config, key):
    value = getattr(config, key, None)
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


def _declared(lm: nn.Module) -> OutputHead:
    """The head the table above says this model has (not yet verified)."""
    config = _text_config(lm.config)
    out = lm.get_output_embeddings()
    bias = isinstance(getattr(out, "bias", None), torch.Tensor)
    softcap = next((v for v in (_number(config, k) for k in SOFTCAP_KEYS) if v is not None and v > 0), None)
    scale = 1.0
    model_type = getattr(config, "model_type", None) or getattr(lm.config, "model_type", None)
    if model_type in SCALE_RULES:
        key, divides = SCALE_RULES[model_type]
        value = _number(config, key)
        if value is not None and value != 0:
            scale = 1.0 / value if divides else value
    return OutputHead(bias=bias, scale=scale, softcap=softcap)


def _where(lm: nn.Module) -> str:
    return f"model {getattr(lm.config, 'name_or_path', '') or '?'} ({type(lm).__name__})"


def output_head(lm: nn.Module) -> OutputHead:
    """The `OutputHead` of a Hugging Face causal LM, verified against the model's own forward.

    Raises ConfigError (naming the model, its class and the reason) when the head is not a
    [V, H] weight, or when the model's logits on probe hidden states differ from the fused
    formula with the declared bias, scale and cap (``_probe``).
    """
    out = lm.get_output_embeddings()
    weight = getattr(out, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(f"{_where(lm)}: no output embedding with a [vocab, hidden] weight "
                          "(get_output_embeddings()); the fused head cannot score it")
    head = _declared(lm)
    if weight.device.type == "meta":
        return head
    _probe(lm, head)
    return head


class _FixedBackbone(nn.Module):
    """Stands in for the backbone during the probe: returns the given hidden states (and notes
    that it was called) and forwards any other attribute to the real backbone."""

    def __init__(self, real: nn.Module, hidden: torch.Tensor):
        super().__init__()
        self.__dict__.update(_real=real, _hidden=hidden, _called=False)

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast
        self.__dict__["_called"] = True
        return BaseModelOutputWithPast(last_hidden_state=self.__dict__["_hidden"])

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)


def _model_logits(lm: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [T, H], the model's own logits for them [T, V']).

    First the model's forward with its backbone swapped for one that returns `hidden` [1, T, H]
    (no backbone compute, probe magnitudes chosen by ``_probe_hidden``). When the forward does
    not go through the backbone module (OPT calls ``model.decoder``) or needs more of it, a real
    forward on T tokens instead: the backbone's hidden states, as ``LogProbModel`` computes them,
    against ``lm(...).logits`` for the same tokens."""
    prefix = getattr(lm, "base_model_prefix", "")
    real = getattr(lm, prefix, None) if prefix else None
    v = lm.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(1, hidden.shape[1] + 1, device=hidden.device) % v).unsqueeze(0)
    mask = torch.ones_like(ids)
    if isinstance(real, nn.Module) and real is lm.base_model and prefix in lm._modules:
        stub = _FixedBackbone(real, hidden)
        lm._modules[prefix] = stub
        try:
            logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
            if stub.__dict__["_called"]:
                return hidden[0], logits
        except Exception:  # the forward reads more of the backbone than its output: real forward below
            pass
        finally:
            lm._modules[prefix] = real
    out = lm.base_model(input_ids=ids, attention_mask=mask)
    real_hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return real_hidden[0], lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]


def _probe_hidden(weight: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """Probe hidden states [1, T, H] in the weight's dtype: row t points along a vocabulary row
    of the weight, sized so that its largest logit is about 0.5, 5, 50, 500 (after the scale):
    small rows see a bias or an offset, large rows a missing or extra cap."""
    gen = torch.Generator().manual_seed(0)
    w = weight.detach()
    v, _ = w.shape
    rows = torch.randint(0, v, (PROBE_TOKENS,), generator=gen).tolist()
    out = []
    for t, j in enumerate(rows):
        vec = w[j].double().cpu()
        norm2 = float(vec.square().sum())
        if norm2 == 0.0:
            vec = torch.randn(w.shape[1], generator=gen, dtype=torch.float64)
            norm2 = float(vec.square().sum())
        target = 0.5 * 10.0 ** t / abs(head.scale)
        out.append(vec * (target / norm2))
    return torch.stack(out).unsqueeze(0).to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def _probe(lm: nn.Module, head: OutputHead) -> None:
    """Raises ConfigError unless the model's logits equal the fused formula on probe hidden states."""
    weight = lm.get_output_embeddings().weight
    bias = lm.get_output_embeddings().bias if head.bias else None
    hidden = _probe_hidden(weight, head)
    was_training = lm.training
    lm.eval()
    try:
        h, got = _model_logits(lm, hidden)
    except Exception as e:
        raise ConfigError(f"{_where(lm)}: cannot run the model's own head on probe hidden states to check that "
                          f"the fused head reproduces it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                          ) from None
    finally:
        lm.train(was_training)
    v = weight.shape[0]
    if got.dim() != 2 or got.shape != (hidden.shape[1], v):
        raise ConfigError(f"{_where(lm)}: its logits are {tuple(got.shape)} for {hidden.shape[1]} positions, not "
                          f"[positions, {v}] (the output weight's rows): the model slices or reshapes its logits, "
                          "which the fused head does not reproduce")
    eps = torch.finfo(weight.dtype).eps
    worst, at = 0.0, (0, 0, 0.0, 0.0)
    for s in range(0, v, 8192):  # float64 in vocabulary blocks: never a [V, H] float64 copy
        e = min(s + 8192, v)
        blk = Head(bias[s:e] if bias is not None else None, head.scale, head.softcap)
        want = reference_logits(h, weight[s:e], blk, torch.float64)
        size = h.double().abs() @ weight[s:e].double().abs().T
        if bias is not None:
            size = size + bias[s:e].double().abs()
        tol = PROBE_ULPS * eps * (abs(head.scale) * size + want.abs()) + 1e-6
        ratio = ((got[:, s:e].double() - want).abs() / tol).nan_to_num(float("inf"))
        i = int(ratio.argmax())
        t, col = divmod(i, e - s)
        if float(ratio[t, col]) > worst:
            worst, at = float(ratio[t, col]), (t, s + col, float(got[t, s + col]), float(want[t, col]))
    if worst > 1.0:
        t, col, g, w = at
        raise ConfigError(
            f"{_where(lm)}: the fused head cannot reproduce this model's output head: with its declared head "
            f"({head.describe()}) it computes logit {w:.6g} where the model gives {g:.6g} (probe position {t}, "
            f"vocabulary entry {col}; {worst:.3g}x the rounding tolerance). The fused head supports an output "
            f"bias, a constant logit scale and a final tanh soft-cap ({', '.join(SOFTCAP_KEYS)}; scale rules for "
            f"model types {', '.join(sorted(SCALE_RULES))}); this model applies something else between its last "
            "hidden state and its logits")
