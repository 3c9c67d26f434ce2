"""Configuration: Hydra composition of conf/ plus checks that fail before any work.

Hydra's compose API gives the seed's override grammar (``model=pythia28``,
``datasets=[hh]``, ``loss.beta=0.1``) without Hydra changing the working directory
or writing its own output folders.
"""
from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TRAINERS = {"BasicTrainer": "basic", "FSDPTrainer": "fsdp", "fsdp2": "fsdp", "basic": "basic", "fsdp": "fsdp"}
LOSSES = ("sft", "dpo", "ipo", "caldpo")
OPTIMIZERS = ("RMSprop", "AdamW", "Adam", "SGD")
DATASETS = ("hh", "tldr", "sample")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the option."""


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with command-line overrides (Hydra grammar)."""
    overrides = list(overrides or [])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="caldpo.train.conf", version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override: {e}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Reject configurations that cannot run, before loading models or data."""
    world_size = world_size or world_size_from_env()
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {e}") from None
    if cfg.trainer not in TRAINERS:
        raise ConfigError(f"trainer={cfg.trainer!r}: choose one of {sorted(TRAINERS)}")
    if TRAINERS[cfg.trainer] == "basic" and world_size > 1:
        raise ConfigError(f"trainer={cfg.trainer} runs in one process; use trainer=FSDPTrainer under torchrun "
                          f"(WORLD_SIZE={world_size})")
    if cfg.loss.name not in LOSSES:
        raise ConfigError(f"loss={cfg.loss.name!r}: choose one of {list(LOSSES)}")
    if cfg.loss.name != "sft" and not cfg.loss.beta > 0:
        raise ConfigError(f"loss.beta={cfg.loss.beta}: must be > 0")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.optimizer!r}: choose one of {list(OPTIMIZERS)}")
    names = list(cfg.datasets) if not isinstance(cfg.datasets, str) else [cfg.datasets]
    if not names:
        raise ConfigError("datasets=[]: name at least one dataset")
    for name in names:
        if name not in DATASETS:
            raise ConfigError(f"datasets: unknown dataset {name!r}; choose from {list(DATASETS)}")
    for name, path in (cfg.data.paths or {}).items():
        if name not in DATASETS:
            raise ConfigError(f"data.paths.{name}: unknown dataset; choose from {list(DATASETS)}")
        if path is not None and not Path(path).exists():
            raise ConfigError(f"data.paths.{name}={path}: no such file or directory")
    if cfg.data.on_error not in ("raise", "skip"):
        raise ConfigError(f"data.on_error={cfg.data.on_error!r}: choose raise or skip")
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]}: must be a positive integer")
    per_step = cfg.gradient_accumulation_steps * world_size
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by gradient_accumulation_steps "
                          f"({cfg.gradient_accumulation_steps}) x world size ({world_size})")
    if cfg.eval_batch_size % world_size:
        raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} is not divisible by the world size ({world_size})")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length={cfg.max_prompt_length} must be < max_length={cfg.max_length}")
    if cfg.model.archive is not None and not Path(cfg.model.archive).is_file():
        raise ConfigError(f"model.archive={cfg.model.archive}: no such file")
    if cfg.model.preset != "tiny" and cfg.model.name_or_path is None:
        raise ConfigError("model.name_or_path: required for this model preset")
    if cfg.model.fsdp_policy_mp not in (None, "bfloat16", "float16", "float32"):
        raise ConfigError(f"model.fsdp_policy_mp={cfg.model.fsdp_policy_mp!r}: choose bfloat16, float16, float32 or null")
    if cfg.model.attn_implementation not in ("auto", "sdpa", "flash_attention_2", "eager"):
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation!r}: "
                          "choose auto, sdpa, flash_attention_2 or eager")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r}: choose auto, cpu or cuda")
    if cfg.reference.mode not in ("model", "cache"):
        raise ConfigError(f"reference.mode={cfg.reference.mode!r}: choose model or cache")
    if cfg.kernels.backend not in ("auto", "torch", "native", "triton", "reference"):
        raise ConfigError(f"kernels.backend={cfg.kernels.backend!r}: choose auto, torch, native, triton or reference")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume={cfg.resume!r}: choose auto or never")
    if cfg.save_every is not None and int(cfg.save_every) < 1:
        raise ConfigError(f"save_every={cfg.save_every}: must be >= 1 or null")


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.local_run_root) / cfg.exp_name
