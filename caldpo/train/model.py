"""Models: presets and loading, the hidden-state forward with the fused head, FSDP2 wrapping.

The backbone returns hidden states; ``caldpo.kernels.sequence_logprobs`` applies the
output head, log-softmax and gather in one fused op, so no training path builds
``[tokens x vocab]`` logits. The head is called inside the root module's forward:
under FSDP2 that is where the root's parameters (embeddings, head) are unsharded.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from caldpo.kernels import sequence_logprobs

from .config import ConfigError

log = logging.getLogger("caldpo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_path(cfg: DictConfig) -> str:
    """Where the weights come from: a hub name, a local directory, or the tiny local build."""
    if cfg.model.preset == "tiny" and cfg.model.name_or_path is None:
        from .tiny import tiny_model_dir
        return str(tiny_model_dir())
    return str(cfg.model.name_or_path)


def load_tokenizer(cfg: DictConfig, path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name_or_path or path,
                                        trust_remote_code=bool(cfg.model.trust_remote_code))
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
    return tok


def check_attention(cfg: DictConfig, device: torch.device) -> str:
    """The attention implementation to use: ``auto`` picks flash-attn on CUDA when it is installed,
    else SDPA; an explicit ``flash_attention_2`` that cannot run is an error, never a silent fallback."""
    impl = cfg.model.attn_implementation
    if impl == "auto":
        return ("flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
                else "sdpa")
    if impl == "flash_attention_2":
        if device.type != "cuda":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; "
                              "use model.attn_implementation=sdpa on CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                              "pip install 'caldpo[flash]' or use model.attn_implementation=sdpa")
    return impl


def load_causal_lm(cfg: DictConfig, path: str, dtype: torch.dtype, attn: str) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn,
        trust_remote_code=bool(cfg.model.trust_remote_code), low_cpu_mem_usage=True)
    model.config.use_cache = False
    return model


def load_archive_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state`` of a reference-format ``policy.pt`` (loaded with weights_only=True)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state" not in blob:
        raise ConfigError(f"model.archive={path}: not a policy.pt checkpoint (no 'state' key)")
    return blob["state"]


def apply_archive(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ConfigError(f"model.archive={path} does not match model {model.config.name_or_path}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")


class LogProbModel(nn.Module):
    """A causal LM whose forward returns per-sequence response log-probs via the fused head."""

    def __init__(self, lm: nn.Module, backend: str = "auto"):
        super().__init__()
        self.lm = lm
        self.backend = backend

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                average_log_prob: bool = False) -> torch.Tensor:
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weight = self.lm.get_output_embeddings().weight
        return sequence_logprobs(hidden, weight, labels, average_log_prob=average_log_prob, backend=self.backend)


def transformer_blocks(lm: nn.Module, block_name: str | None) -> list[nn.Module]:
    if block_name is None:
        names = getattr(lm, "_no_split_modules", None) or []
        if not names:
            raise ConfigError("model.block_name: cannot infer the transformer block class; set it")
        block_name = names[0]
    blocks = [m for m in lm.modules() if type(m).__name__ == block_name]
    if not blocks:
        raise ConfigError(f"model.block_name={block_name}: no module of that class in the model")
    return blocks


def apply_activation_checkpointing(lm: nn.Module, block_name: str | None) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac, checkpoint_wrapper)
    classes = {type(b) for b in transformer_blocks(lm, block_name)}
    apply_ac(lm, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: type(m) in classes)


def shard(model: LogProbModel, cfg: DictConfig, mesh, *, trainable: bool) -> LogProbModel:
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings + head stay in the root)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = None
    if cfg.model.fsdp_policy_mp is not None:
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.model.fsdp_policy_mp],
                                  reduce_dtype=torch.float32 if trainable else None)
    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    for block in transformer_blocks(model.lm, cfg.model.block_name):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def count_matmul_params(lm: nn.Module) -> tuple[int, int, int, int]:
    """(non-embedding matmul params incl. output head, layers, hidden size, vocab) for FLOP counting."""
    cfg = lm.config
    emb = lm.get_input_embeddings()
    n = sum(p.numel() for p in lm.parameters())
    n -= emb.weight.numel() if emb is not None else 0
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    return n, layers, hidden, getattr(cfg, "vocab_size", 0)
