"""Configuration: typed schema (dataclasses), Hydra composition of conf/, one preflight.

The schema is one dataclass per group, registered in Hydra's ConfigStore; the yaml files in
conf/ extend it and hold the defaults users read (``config.yaml`` for the top level,
``conf/model/*.yaml`` presets, ``conf/loss/*.yaml`` one file per loss, each extending its
own loss dataclass). A key in a yaml file that the schema lacks fails every composition
(tests/test_config.py composes every group), and so does a command-line key the schema
lacks, with or without ``+``: :func:`load_config` names it and the closest known key.

Hydra's compose API gives the seed's override grammar (``model=pythia28``,
``datasets=[hh]``, ``loss.beta=0.1``) without Hydra changing the working directory
or writing its own output folders.

:func:`validate` is the one preflight: every check of options and environment (CUDA,
flash-attn, TensorBoard/W&B packages, archive and data paths, hub reachability, world size
divisibility, visible GPUs) runs there, before any data or model loads.

Run identity: :func:`run_identity` lists the options that change what trains (field metadata
``identity=False`` marks the rest: logging, locations, resume, device niceties, generation,
checkpoint cadence). The default run directory is ``<local_run_root>/<exp_name>_<hash8>``
of those options, so the identical command resumes (crash, Slurm requeue) and a changed
option gets a directory of its own; :func:`check_run_dir` stops a run whose explicit
``run_dir`` holds a run with other training options.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TRAINERS = {"BasicTrainer": "basic", "FSDPTrainer": "fsdp", "fsdp2": "fsdp", "basic": "basic", "fsdp": "fsdp"}
LOSSES = ("sft", "dpo", "ipo", "caldpo", "cal_dpo")
OPTIMIZERS = ("RMSprop", "AdamW", "Adam", "SGD")
DATASETS = ("hh", "tldr", "sample")
CONF_DIR = Path(__file__).resolve().parent / "conf"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the option."""


def opt(help: str, *, default: Any = MISSING, choices: tuple | None = None, identity: bool = True) -> Any:
    """A schema field. Defaults live in the yaml files (MISSING here: a key the yaml lacks is an error).

    ``choices``: the allowed values, checked by :func:`validate`. ``identity=False``: the option
    does not change what trains (it is left out of the run identity).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "identity": identity})


# ----------------------------------------------------------------------------- schema

@dataclass
class ModelConfig:
    """``model=<preset>`` (conf/model/*.yaml): the causal LM trained as policy (and used as reference)."""
    preset: str = opt("preset name (tiny; pythia70m, pythia160m, pythia410m, pythia1b, pythia14, pythia28, "
                      "pythia69, pythia12b; hf)")
    name_or_path: Optional[str] = opt("hub name or local Hugging Face model directory (tiny: null, built locally)")
    tokenizer_name_or_path: Optional[str] = opt("tokenizer hub name or directory; null: name_or_path")
    archive: Optional[str] = opt("<run>/LATEST/policy.pt whose state is loaded into policy and reference")
    block_name: Optional[str] = opt("transformer block class sharded by FSDP2 / checkpointed; "
                                    "null: the model's _no_split_modules[0]")
    policy_dtype: str = opt("policy parameter dtype", choices=("float32", "bfloat16", "float16"))
    reference_dtype: str = opt("reference model dtype (float16 runs as float32 on CPU)",
                               choices=("float32", "bfloat16", "float16"))
    fsdp_policy_mp: Optional[str] = opt("FSDP2 MixedPrecisionPolicy param dtype (reduce in fp32); null: none",
                                        choices=(None, "bfloat16", "float16", "float32"))
    attn_implementation: str = opt("auto: flash_attention_2 if flash-attn is installed on CUDA, else sdpa; packed "
                                   "layouts run as varlen segments where they can (caldpo/train/attention.py) | "
                                   "sdpa (packed layouts on dense 4D masks) | varlen | flash_attention_2 | eager | "
                                   "flex_attention",
                                   choices=("auto", "sdpa", "varlen", "flash_attention_2", "eager", "flex_attention"))
    trust_remote_code: bool = opt("let transformers run the model repository's code")


@dataclass
class SFTLoss:
    """``loss=sft``: -log pi(y_w|x), summed over response tokens, batch mean."""
    name: str = opt("loss name", choices=LOSSES)


@dataclass
class DPOLoss:
    """``loss=dpo``: -log sigmoid(beta (h_w - h_l)), h = log pi - log pi_ref (summed log-probs)."""
    name: str = opt("loss name", choices=LOSSES)
    beta: float = opt("inverse temperature; rewards are beta * h")
    label_smoothing: float = opt("conservative DPO when > 0")
    reference_free: bool = opt("true: the reference leaves the sigmoid only, -log sigmoid(beta (log pi(y_w) - "
                               "log pi(y_l))); rewards beta*h keep h = log pi - log pi_ref (the reference still runs)")


@dataclass
class IPOLoss:
    """``loss=ipo``: (h_w - h_l - 1/(2 beta))^2."""
    name: str = opt("loss name", choices=LOSSES)
    beta: float = opt("sets the margin target 1/(2 beta); rewards are beta * h")
    reference_free: bool = opt("true: the reference leaves the margin only, (log pi(y_w) - log pi(y_l) - "
                               "1/(2 beta))^2; rewards beta*h keep h = log pi - log pi_ref (the reference still runs)")


@dataclass
class CalDPOLoss:
    """``loss=caldpo``: -log sigmoid(h_w - h_l) + w ((h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2)."""
    name: str = opt("loss name", choices=LOSSES)
    beta: float = opt("sets the calibration targets +-1/(2 beta) (no beta inside the sigmoid)")
    calibration_weight: float = opt("w: 1.0 in the reference Pythia code, 0.5 in the authors' later code")
    reference_free: bool = opt("true: the sigmoid term becomes -log sigmoid(log pi(y_w) - log pi(y_l)); the "
                               "calibration terms and rewards keep h = log pi - log pi_ref (the reference still "
                               "runs), as the authors' code")


@dataclass
class AuthorsCalDPOLoss:
    """``loss=cal_dpo``: the authors' loss with their ``shift`` s.

    s != 0: -log sigmoid(h_w - h_l) + (h_w - (1-s)/beta)^2 + (h_l + s/beta)^2;
    s = 0: their plain DPO, -log sigmoid(beta (h_w - h_l)).
    """
    name: str = opt("loss name", choices=LOSSES)
    beta: float = opt("sets the calibration targets (1-s)/beta and -s/beta; the DPO beta when s = 0")
    shift: float = opt("s: 0.5 is Cal-DPO (= loss=caldpo), 0 is plain DPO")
    reference_free: bool = opt("true: the sigmoid term becomes -log sigmoid(log pi(y_w) - log pi(y_l)) (s = 0: "
                               "-log sigmoid(beta (log pi(y_w) - log pi(y_l)))); the calibration terms and rewards "
                               "keep h = log pi - log pi_ref (the reference still runs), as the authors' code")


LOSS_SCHEMAS = {"sft": SFTLoss, "dpo": DPOLoss, "ipo": IPOLoss, "caldpo": CalDPOLoss, "cal_dpo": AuthorsCalDPOLoss}


@dataclass
class DataPaths:
    """``data.paths.<dataset>``: local copies instead of the hub (null: the hub)."""
    hh: Optional[str] = opt("hh-rlhf checkout (<subset>/{train,test}.jsonl[.gz]) or one .jsonl[.gz]")
    tldr: Optional[str] = opt("a preproc output dir, or a raw comparisons / filtered-SFT file")
    sample: Optional[str] = opt("another HH-format sample instead of the shipped one")


@dataclass
class DataConfig:
    """``data.*``: where the datasets come from and what a broken row does."""
    paths: DataPaths = field(default_factory=DataPaths, metadata={"help": "local dataset paths"})
    on_error: str = opt("raise: stop at a broken row (file:line) | skip: skip and count it",
                        choices=("raise", "skip"))
    on_change: str = opt("a resumed run whose split's examples differ from those its checkpoint trained on "
                         "(rows edited, added, removed, reordered): refuse: stop, naming the split and its files "
                         "| continue: resume on the changed data, with a warning",
                         choices=("refuse", "continue"), identity=False)
    cache_dir: Optional[str] = opt("datasets library cache for hub downloads", identity=False)
    held_out: float = opt("fraction of prompts cut out as the test split (sha256 of the prompt) when one "
                          "data file serves both splits; a folder's train/test files are used as they are")
    max_row_bytes: int = opt("largest data row in bytes (a JSONL line, a JSON array item, a parquet or hub row); a "
                             "larger one stops the load naming its file:line and size (data.on_error=skip: skipped "
                             "and counted as row_too_large) before it is decoded", identity=False)
    token_cache_dir: Optional[str] = opt("folder of the tokenized-split cache (token ids in flat arrays, built once "
                                         "per data content, tokenizer and lengths, memory-mapped by every rank); "
                                         "null: $CALDPO_CACHE/tokens, else ~/.cache/caldpo/tokens", identity=False)


@dataclass
class KernelsConfig:
    """``kernels.*``: the fused log-prob kernels."""
    backend: str = opt("auto (triton on CUDA; on CPU native when the C++ extension builds, else torch) | "
                       "torch | native (C++, CPU) | triton | reference",
                       choices=("auto", "torch", "native", "triton", "reference"))
    block_bytes: Optional[int] = opt("bytes of fp32 logits per vocabulary block (torch, native, Triton GEMM "
                                     "forms); null: 16 MiB on CPU, 128 MiB on CUDA")
    min_block: int = opt("narrowest block edge in rows or columns (GEMM efficiency)")
    axis: str = opt("torch backend: chunk over the vocab or the tokens; auto: vocab when tokens <= vocab",
                    choices=("auto", "vocab", "tokens"))
    gemm: str = opt("torch backend, 16-bit inputs: auto (16-bit GEMMs on CUDA, fp32 on CPU) | fp32 | input",
                    choices=("auto", "fp32", "input"))
    forward_form: str = opt("triton, 16-bit inputs: fused (one kernel) | gemm (cuBLAS + a Triton pass)",
                            choices=("fused", "gemm"))
    backward_form: str = opt("triton, 16-bit inputs: gemm (cuBLAS + a Triton pass) | fused (one kernel, atomics)",
                             choices=("gemm", "fused"))


@dataclass
class ReferenceConfig:
    """``reference.*``: how the reference log-probs are obtained."""
    mode: str = opt("model: run the reference model each step | cache: precompute its log-probs once",
                    choices=("model", "cache"))
    cache_dir: Optional[str] = opt("reference cache folder; null: <run_dir>/ref_cache", identity=False)


@dataclass
class WandbConfig:
    """``wandb.*``: Weights & Biases mirror of metrics.jsonl."""
    enabled: bool = opt("log to W&B (pip install wandb)")
    project: str = opt("W&B project")
    entity: Optional[str] = opt("W&B entity (team or user)")


@dataclass
class GenerateConfig:
    """``generate.*``: ``python -m caldpo.train.generate``."""
    split: str = opt("dataset split whose prompts are used", choices=("train", "test"))
    n_prompts: Optional[int] = opt("number of prompts; null: every prompt of the split (as the authors' generate.py)")
    batch_size: Optional[int] = opt("prompts per generate call; null: eval_batch_size")
    temperature: float = opt("0: greedy decoding (the authors' generate.py); > 0: sampling at this temperature")
    top_p: float = opt("nucleus sampling mass (sampling only)")
    output: Optional[str] = opt("output JSON; null: <run_dir>/samples.json")


@dataclass
class Config:
    """``python -m caldpo.train key=value ...``: the top level (conf/config.yaml)."""
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model preset group"})
    loss: Any = field(default=MISSING, metadata={"help": "loss group: one dataclass per loss"})
    seed: int = opt("seed of model init, data order (the reference iterator's seed) and sampling; 0 <= seed < 2**32")
    exp_name: str = opt("experiment name; the default run_dir is <local_run_root>/<exp_name>_<hash8>", identity=False)
    run_dir: Optional[str] = opt("run directory; null: <local_run_root>/<exp_name>_<hash8 of the training "
                                 "options>, so the same command resumes and a changed option starts anew",
                                 identity=False)
    local_run_root: str = opt("parent of default run directories", identity=False)
    resume: str = opt("auto: resume from <run_dir>/checkpoints if present | never", choices=("auto", "never"),
                      identity=False)
    debug: bool = opt("no checkpoints or exports", identity=False)
    datasets: list[str] = opt("any of hh, tldr, sample (datasets=hh means [hh])")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data sources"})
    device: str = opt("auto | cpu | cuda", choices=("auto", "cpu", "cuda"), identity=False)
    trainer: str = opt("BasicTrainer (one process) | FSDPTrainer (alias fsdp2; torchrun for many processes)",
                       choices=tuple(TRAINERS), identity=False)
    allow_one_gpu: bool = opt("FSDPTrainer outside torchrun on a machine with several GPUs: train on one "
                              "anyway (default: stop and print the torchrun line)", identity=False)
    batch_size: int = opt("global batch: examples per optimizer step")
    eval_batch_size: int = opt("examples per evaluation batch (global)")
    gradient_accumulation_steps: int = opt("micro-batches per step; micro-batch = batch_size / (this x world)")
    optimizer: str = opt("torch.optim class", choices=OPTIMIZERS)
    lr: float = opt("learning rate after warm-up")
    weight_decay: float = opt("optimizer weight decay")
    warmup_steps: int = opt("linear warm-up steps, then constant")
    max_grad_norm: float = opt("gradient clipping norm")
    max_length: int = opt("max tokens of prompt + response")
    max_prompt_length: int = opt("max prompt tokens when prompt + response is too long")
    n_epochs: int = opt("epochs over the training data (each trains its full batches: n // batch_size steps)")
    n_examples: Optional[int] = opt("stop at the first batch boundary at or past this many training examples, "
                                    "counted as the reference iterator counts them (overrides n_epochs when set)")
    n_eval_examples: int = opt("evaluation examples: the reference trainer's first ceil(n / eval_batch_size) "
                               "batches of the test split's first-epoch order, less pairs dropped at load",
                               identity=False)
    eval_every: int = opt("examples between evaluations", identity=False)
    do_first_eval: bool = opt("evaluate before the first step", identity=False)
    save_every: Optional[int] = opt("optimizer steps between resume checkpoints; null: only at the end and on stop",
                                    identity=False)
    keep_checkpoints: int = opt("resume checkpoints kept", identity=False)
    max_nonfinite_steps: int = opt("stop after this many consecutive steps with a non-finite loss or grad norm "
                                   "(each is skipped: no optimizer step)", identity=False)
    minimum_log_interval_secs: float = opt("progress bar / log line interval", identity=False)
    activation_checkpointing: bool = opt("recompute block activations in backward (less memory)", identity=False)
    compile: bool = opt("torch.compile the backbone", identity=False)
    tf32: bool = opt("CUDA: fp32 matmuls on TF32 tensor cores (torch.set_float32_matmul_precision('high')); "
                     "false keeps full fp32 (what bf16/fp16 compute does not touch)", identity=False)
    layout: str = opt("auto: on CPU prefix_shared where the attention can run packed rows (segments, sdpa, eager, "
                      "flex_attention), else padded; padded on CUDA until a GPU table shows prefix sharing ahead | "
                      "padded: two padded rows per pair (the oracle; no mask when right-padded) | packed: padding-free "
                      "rows | prefix_shared: packed, one prompt | chosen | rejected sequence per pair",
                      choices=("auto", "padded", "packed", "prefix_shared"))  # numerics: part of the run identity
    sample_during_eval: bool = opt("generate samples from the policy and the reference at each evaluation",
                                   identity=False)
    n_eval_model_samples: int = opt("prompts sampled at each evaluation", identity=False)
    max_new_tokens: int = opt("tokens generated per response (the authors' generate.py: 100)", identity=False)
    kernels: KernelsConfig = field(default_factory=KernelsConfig, metadata={"help": "kernel choices"})
    reference: ReferenceConfig = field(default_factory=ReferenceConfig, metadata={"help": "reference log-probs"})
    export_hf: bool = opt("also write a save_pretrained export to <run_dir>/LATEST/hf", identity=False)
    export_at_eval: bool = opt("write <run_dir>/step-<examples>/policy.pt at each evaluation after the first "
                               "(the authors' trainer does)", identity=False)
    keep_eval_exports: Optional[int] = opt("keep only the newest K step-* exports (each is the size of the "
                                           "model); null: keep all", identity=False)
    wandb: WandbConfig = field(default_factory=WandbConfig,
                               metadata={"help": "Weights & Biases", "identity": False})
    tensorboard: bool = opt("mirror metrics to TensorBoard in <run_dir>/tb (pip install tensorboard)",
                            identity=False)
    generate: GenerateConfig = field(default_factory=GenerateConfig,
                                     metadata={"help": "python -m caldpo.train.generate", "identity": False})


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in LOSS_SCHEMAS.items():
        cs.store(group="loss", name=f"schema_{name}", node=schema)


_register()


# ----------------------------------------------------------------------------- composition

def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def group_options(group: str) -> list[str]:
    """The yaml presets of a config group (conf/<group>/*.yaml)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="caldpo.train.conf", version_base=None):
            return compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _paths(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a composed config, intermediate nodes included."""
    out: set[str] = set()
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}{k}"
            out.add(path)
            out |= _paths(node._get_node(k), path + ".")
    return out


def _unknown(key: str, known: set[str], loss: str, plus: bool) -> ConfigError:
    given = ("+" if plus else "") + key
    owners_of = {f"loss.{f.name}": [n for n, s in LOSS_SCHEMAS.items() if f.name in {g.name for g in dataclasses.fields(s)}]
                 for schema in LOSS_SCHEMAS.values() for f in dataclasses.fields(schema)}  # every loss's keys
    close = difflib.get_close_matches(key, sorted(known | set(owners_of)), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}?" if close else "no known option is close"
    if close and close[0] not in known:  # an option of another loss
        owners = owners_of[close[0]]
        hint += f" (loss={loss} has no {close[0][5:]}; {', '.join(owners)} {'do' if len(owners) > 1 else 'does'})"
    if key in owners_of:
        hint = f"{key} is an option of {' / '.join(f'loss={o}' for o in owners_of[key])}, not loss={loss}"
    return ConfigError(f"{given}: unknown option; {hint} (python -m caldpo.train --help lists every option)")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """``datasets=hh`` -> ``datasets=[hh]`` (and ``datasets=hh,tldr`` -> ``[hh,tldr]``)."""
    out = []
    for o in overrides:
        if "=" in o and _key(o) == "datasets" and not o.startswith("~"):
            k, v = o.split("=", 1)
            if v.strip() and not v.strip().startswith("[") and v.strip() != "null":
                o = f"{k}=[{v.strip()}]"
        out.append(o)
    return out


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with command-line overrides (Hydra grammar) against the schema.

    Raises ConfigError for an unknown key (with or without ``+``; the message names the
    closest known key), an unknown group option, a value of the wrong type, or a yaml key
    that the schema lacks.
    """
    overrides = normalize_overrides(list(overrides or []))
    groups = {"model": group_options("model"), "loss": group_options("loss")}
    selected = {}
    for o in overrides:
        k = _key(o)
        if k in groups and "=" in o:
            v = o.split("=", 1)[1]
            if v not in groups[k]:
                close = difflib.get_close_matches(v, groups[k], n=1)
                hint = f"did you mean {k}={close[0]}? " if close else ""
                raise ConfigError(f"{k}={v}: unknown {k}; {hint}choose one of {groups[k]}")
            selected[k] = o
    try:
        base = _compose(list(selected.values()))
        known = _paths(base)
        loss = base.loss.name
        for o in overrides:
            k = _key(o)
            if k in selected or k.startswith("hydra."):
                continue
            if k not in known:
                raise _unknown(k, known, loss, plus=o.startswith("+"))
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        typed = re.match(r"Value '(.*)' (?:of type '\w+' could not be converted to|is not a valid) (\w+)", str(cause))
        if typed and getattr(cause, "full_key", None):  # a value of the wrong type: say which type the key takes
            kind = {"float": "a number (e.g. 5e-7)", "integer": "a whole number", "boolean": "true or false",
                    "bool": "true or false"}.get(typed.group(2).lower(), typed.group(2))
            raise ConfigError(f"{cause.full_key}={typed.group(1)}: {cause.full_key} takes {kind}") from None
        msg = " ".join(str(e).split())
        if e.__cause__ is not None:
            msg += ": " + " ".join(str(e.__cause__).split())
        if "not in '" in msg and "full_key" in msg:
            msg += " (a key in caldpo/train/conf/*.yaml that the schema in caldpo/train/config.py lacks: add a field)"
        raise ConfigError(f"bad configuration: {msg}") from None
    return cfg


# ----------------------------------------------------------------------------- preflight

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _schema_fields(node: DictConfig) -> list[dataclasses.Field]:
    t = OmegaConf.get_type(node)
    return list(dataclasses.fields(t)) if t is not None and dataclasses.is_dataclass(t) else []


def _check_choices(node: DictConfig, prefix: str = "") -> None:
    for f in _schema_fields(node):
        value = node._get_node(f.name)
        if isinstance(value, DictConfig):
            _check_choices(value, f"{prefix}{f.name}.")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and node[f.name] not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{prefix}{f.name}={node[f.name]}: choose one of {shown}")


def _is_local(name: str | None) -> bool:
    return name is None or Path(name).expanduser().exists()


def _hub_names(cfg: DictConfig) -> list[tuple[str, str, str]]:
    """(option, hub name, repo type) of every source the run would fetch from the hub."""
    from .data import HH_HUB, TLDR_PREF_HUB, TLDR_SFT_HUB
    out = []
    m = cfg.model
    if not (m.preset == "tiny" and m.name_or_path is None):
        for key in ("name_or_path", "tokenizer_name_or_path"):
            if not _is_local(m[key]):
                out.append((f"model.{key}", m[key], "model"))
    for name in cfg.datasets:
        if name == "sample" or (cfg.data.paths or {}).get(name):
            continue
        repo = HH_HUB if name == "hh" else (TLDR_SFT_HUB if cfg.loss.name == "sft" else TLDR_PREF_HUB[0])
        out.append((f"datasets={name} (data.paths.{name})", repo, "dataset"))
    return out


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def _in_cache(repo: str, kind: str, cache_dir: str | None) -> bool:
    """Whether a hub repo has a local copy the libraries can use offline."""
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    folder = f"{kind}s--{repo.replace('/', '--')}"
    roots = [hub] + ([Path(cache_dir)] if cache_dir else [])
    if kind == "dataset":
        roots.append(Path(cache_dir or os.environ.get("HF_DATASETS_CACHE") or home / "datasets"))
        if any((r / repo.replace("/", "___")).exists() for r in roots):
            return True
    return any((r / folder / "snapshots").is_dir() for r in roots)


_PROBE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint (HF_ENDPOINT) within ``timeout`` seconds (DNS included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _PROBE:
        box = {"ok": False}

        def probe():
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                box["ok"] = True
            except OSError:
                pass

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout)
        _PROBE[key] = box["ok"]
    return _PROBE[key]


def _check_hub(cfg: DictConfig) -> None:
    names = [n for n in _hub_names(cfg) if not _in_cache(n[1], n[2], cfg.data.cache_dir)]
    if not names:
        return
    if _offline():
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        why = f"the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is unreachable"
    else:
        return
    option, repo, kind = names[0]
    fix = ("model=hf model.name_or_path=/path/to/model (a local Hugging Face directory)" if kind == "model"
           else f"data.paths.{repo and option.split('=')[1].split()[0]}=/path/to/local/copy")
    raise ConfigError(f"{option}: {repo!r} is not a local path and {why} (nothing cached either); "
                      f"use a local copy: {fix}")


MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")


def _safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file cannot be complete (from its header and size alone), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes: shorter than the 8-byte size of its header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"{size} bytes, but its header alone claims {n}: truncated"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not the JSON of a safetensors file"
    if size < 8 + n + end:
        return f"{size} bytes, but its header describes {8 + n + end}: truncated"
    return None


def _check_model_files(cfg: DictConfig) -> None:
    """Local model and tokenizer folders, before anything loads: the folder has a ``config.json``; every JSON
    file transformers reads there (``MODEL_JSON_FILES``) parses as a JSON object; every ``.safetensors``
    file is as long as its header says. A truncated or edited file is a ConfigError naming it (and, for
    JSON, the line and column), instead of a library traceback after the data has loaded."""
    m = cfg.model
    if m.preset == "tiny" and m.name_or_path is None:
        return  # built locally by caldpo.train.tiny
    for key in ("name_or_path", "tokenizer_name_or_path"):
        if m[key] is None or not Path(m[key]).expanduser().is_dir():
            continue
        folder = Path(m[key]).expanduser()
        option = f"model.{key}={m[key]}"
        fix = "restore it from the model's source (download it again, or save_pretrained again)"
        if key == "name_or_path" and not (folder / "config.json").is_file():
            raise ConfigError(f"{option}: no config.json there: not a Hugging Face model folder (save_pretrained "
                              "writes one); point model.name_or_path at the folder holding config.json")
        for name in MODEL_JSON_FILES:
            file = folder / name
            if not file.is_file():
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:
                raise ConfigError(f"{option}: {file} is not valid JSON ({e}): a truncated or edited file; "
                                  f"{fix}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{option}: {file} holds a JSON {type(data).__name__}, not an object; {fix}")
        if key == "name_or_path":
            for file in sorted(folder.glob("*.safetensors")):
                problem = _safetensors_problem(file)
                if problem:
                    raise ConfigError(f"{option}: {file}: {problem}; {fix}")


def _check_packages(cfg: DictConfig) -> None:
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard=true but TensorBoard is not installed: pip install tensorboard "
                          "(or tensorboard=false)")
    if cfg.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb.enabled=true but wandb is not installed: pip install wandb (or wandb.enabled=false)")


def _check_devices(cfg: DictConfig, world_size: int, argv: list[str] | None, training: bool,
                   launched: bool = False) -> None:
    import torch
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device=cuda but no CUDA device is available (device=cpu or device=auto)")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda)
    impl = cfg.model.attn_implementation
    if impl == "flash_attention_2":
        if not use_cuda:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; "
                              "use model.attn_implementation=sdpa on CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                              "pip install 'caldpo[flash]' or use model.attn_implementation=sdpa")
    if impl == "flex_attention" and not use_cuda and training:
        raise ConfigError("model.attn_implementation=flex_attention: FlexAttention has no backward on CPU; "
                          "use model.attn_implementation=sdpa (the packed layouts run on its dense masks)")
    if not training:
        return
    n_gpus = torch.cuda.device_count() if use_cuda else 0
    under_launcher = launched or "WORLD_SIZE" in os.environ
    if TRAINERS[cfg.trainer] == "fsdp" and not under_launcher and n_gpus > 1 and not cfg.allow_one_gpu:
        args = shlex.join(argv) if argv else f"trainer={cfg.trainer} ..."
        raise ConfigError(f"trainer={cfg.trainer} in one process would train on 1 of the {n_gpus} visible GPUs. "
                          f"Use them all:\n    torchrun --nproc_per_node={n_gpus} -m caldpo.train {args}\n"
                          "or add allow_one_gpu=true to train on one")


def validate(cfg: DictConfig, world_size: int | None = None, *, argv: list[str] | None = None,
             training: bool = True, devices: bool = True, launched: bool = False) -> None:
    """The preflight: reject configurations and environments that cannot run, before any data or model loads.

    ``argv``: the command-line overrides (for the torchrun line of the many-GPU check).
    ``training=False`` (generation) skips the trainer-only checks. ``devices=False`` skips the
    checks of this machine's devices (CUDA, flash-attn, the GPU count): a submission host checks a
    run that will start elsewhere. ``launched``: a launcher will start ``world_size`` processes
    (no many-GPU hint). Raises ConfigError.
    """
    world_size = world_size or world_size_from_env()
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {e}") from None
    _check_choices(cfg)
    if TRAINERS[cfg.trainer] == "basic" and world_size > 1:
        raise ConfigError(f"trainer={cfg.trainer} runs in one process; use trainer=FSDPTrainer under torchrun "
                          f"(WORLD_SIZE={world_size})")
    if OmegaConf.get_type(cfg.loss) is not LOSS_SCHEMAS.get(cfg.loss.name):
        raise ConfigError(f"loss.name={cfg.loss.name}: choose the loss with loss={cfg.loss.name} (the group "
                          "brings that loss's options), not loss.name=")
    if cfg.loss.name != "sft" and not cfg.loss.beta > 0:
        raise ConfigError(f"loss.beta={cfg.loss.beta}: must be > 0")
    if cfg.loss.name == "cal_dpo" and not 0.0 <= cfg.loss.shift <= 1.0:
        raise ConfigError(f"loss.shift={cfg.loss.shift}: must be in [0, 1] (0.5 is Cal-DPO, 0 plain DPO)")
    if not cfg.datasets:
        raise ConfigError("datasets=[]: name at least one dataset")
    for name in cfg.datasets:
        if name not in DATASETS:
            close = difflib.get_close_matches(str(name), DATASETS, n=1)
            raise ConfigError(f"datasets: unknown dataset {name!r}; "
                              f"{f'did you mean {close[0]}? ' if close else ''}choose from {list(DATASETS)}")
    repeated = sorted({str(n) for n in cfg.datasets if list(cfg.datasets).count(n) > 1})
    if repeated:
        raise ConfigError(f"datasets={list(cfg.datasets)}: {', '.join(repeated)} listed more than once "
                          "(its rows would be trained and evaluated twice); name each dataset once")
    for name, path in cfg.data.paths.items():
        if path is not None and not Path(path).expanduser().exists():
            raise ConfigError(f"data.paths.{name}={path}: no such file or directory")
    if cfg.keep_eval_exports is not None and cfg.keep_eval_exports < 1:
        raise ConfigError(f"keep_eval_exports={cfg.keep_eval_exports}: must be >= 1, or null to keep all "
                          "(export_at_eval=false writes none)")
    if not 0.0 < cfg.data.held_out < 1.0:
        raise ConfigError(f"data.held_out={cfg.data.held_out}: must be a fraction in (0, 1)")
    if cfg.data.max_row_bytes < 1:
        raise ConfigError(f"data.max_row_bytes={cfg.data.max_row_bytes}: must be a positive number of bytes")
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]}: must be a positive integer")
    if training:
        per_step = cfg.gradient_accumulation_steps * world_size
        if cfg.batch_size % per_step:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by gradient_accumulation_steps "
                              f"({cfg.gradient_accumulation_steps}) x world size ({world_size})")
        if cfg.eval_batch_size % world_size:
            raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} is not divisible by the world size "
                              f"({world_size})")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"max_prompt_length={cfg.max_prompt_length} must be < max_length={cfg.max_length}")
    if cfg.model.archive is not None and Path(cfg.model.archive).is_dir():
        inside = Path(cfg.model.archive) / "policy.pt"
        raise ConfigError(f"model.archive={cfg.model.archive} is a directory; pass the policy.pt file"
                          + (f": model.archive={inside}" if inside.is_file() else " (<run_dir>/LATEST/policy.pt)"))
    if cfg.model.archive is not None and not Path(cfg.model.archive).is_file():
        raise ConfigError(f"model.archive={cfg.model.archive}: no such file")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ConfigError(f"seed={cfg.seed}: must be in [0, 2**32) (the data order seeds numpy's RandomState "
                          "with it, as the reference iterator does)")
    if training and cfg.n_examples is not None and cfg.n_examples < 1:
        raise ConfigError(f"n_examples={cfg.n_examples}: must be >= 1 (null trains n_epochs over the data)")
    if cfg.model.preset != "tiny" and cfg.model.name_or_path is None:
        raise ConfigError("model.name_or_path: required for this model preset")
    if cfg.save_every is not None and cfg.save_every < 1:
        raise ConfigError(f"save_every={cfg.save_every}: must be >= 1 or null")
    if "/" in cfg.exp_name or "\\" in cfg.exp_name or cfg.exp_name in ("", ".", ".."):
        raise ConfigError(f"exp_name={cfg.exp_name!r}: a name, not a path (no '/', '..' or '.'); "
                          "use run_dir= to choose a directory")
    _check_packages(cfg)
    if devices:
        _check_devices(cfg, world_size, argv, training, launched)
    _check_hub(cfg)
    _check_model_files(cfg)


def preflight(overrides: list[str], *, world_size: int = 1, on_node: bool = True) -> DictConfig:
    """What a job checks before it is queued or before its launcher starts the trainer: the options
    (``load_config``) and ``validate`` for ``world_size`` processes started by a launcher (torchrun,
    Slurm, submitit). ``on_node=False`` (a submission host): the devices of this machine are not the
    job's, so their checks wait for the job, whose script repeats the preflight on its first node.
    A model and tokenizer in local folders are also checked as the trainer will check them when they load
    (``model.load_tokenizer``, ``model.check_vocab_and_positions``: an EOS token, ids inside the head, the
    positions): a job would meet those only after it was queued. Hub names are left to the job.
    Returns the config; raises ConfigError.
    """
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be >= 1")
    cfg = load_config(overrides)
    validate(cfg, world_size, argv=overrides, devices=on_node, launched=True)
    folders = (cfg.model.name_or_path, cfg.model.tokenizer_name_or_path)
    if folders[0] is not None and all(p is None or Path(p).expanduser().is_dir() for p in folders):
        from .model import check_vocab_and_positions, load_tokenizer
        path = str(folders[0])
        check_vocab_and_positions(cfg, load_tokenizer(cfg, path), path)
    return cfg


def preflight_summary(cfg: DictConfig, world_size: int) -> str:
    """One line naming what a preflight passed: the run's main options and its world size."""
    datasets = ",".join(map(str, cfg.datasets))
    archive = f" model.archive={cfg.model.archive}" if cfg.model.archive else ""
    steps = f"n_examples={cfg.n_examples}" if cfg.n_examples is not None else f"n_epochs={cfg.n_epochs}"
    return (f"model={cfg.model.preset} datasets=[{datasets}] loss={cfg.loss.name}{archive} batch_size={cfg.batch_size} "
            f"{steps} device={cfg.device}, world size {world_size}")


# ----------------------------------------------------------------------------- run identity

def _archive_identity(path: str | None) -> Any:
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
        return f"{p} ({st.st_size} bytes, mtime {st.st_mtime_ns})"
    except OSError:
        return str(p)


def _local_identity(value: Any) -> Any:
    """A local path as an absolute path (so the cwd does not change the identity); hub names as given."""
    if isinstance(value, str) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _flat_identity(node: DictConfig, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in _schema_fields(node):
        if not f.metadata.get("identity", True):
            continue
        child = node._get_node(f.name)
        if isinstance(child, DictConfig):
            out.update(_flat_identity(child, f"{prefix}{f.name}."))
        elif isinstance(child, ListConfig):
            out[prefix + f.name] = OmegaConf.to_container(child)
        else:
            out[prefix + f.name] = node[f.name]
    return out


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The options that change what trains, flattened ({"lr": 5e-7, "loss.beta": 0.1, ...}).

    ``model.archive`` stands for the file (absolute path, size, mtime); local model and data
    paths are absolute. Everything with schema metadata ``identity=False`` is left out.
    """
    out = _flat_identity(cfg)
    out["model.archive"] = _archive_identity(cfg.model.archive)
    for k in ("model.name_or_path", "model.tokenizer_name_or_path") + tuple(
            f"data.paths.{n}" for n in cfg.data.paths):
        if k in out:
            out[k] = _local_identity(out[k])
    return out


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_dir(cfg: DictConfig) -> Path:
    """``run_dir`` if set, else ``<local_run_root>/<exp_name>_<hash8 of run_identity>``."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.local_run_root) / f"{cfg.exp_name}_{identity_hash(run_identity(cfg))}"


IDENTITY_FILE = "identity.json"


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def read_identity(path: Path) -> dict[str, Any]:
    """The training options ``<run_dir>/identity.json`` records; ConfigError naming the file and what to do
    when it is not the JSON caldpo writes (truncated by a crash or a full disk, edited, another file)."""
    stored = path / IDENTITY_FILE
    try:
        options = json.loads(stored.read_text(encoding="utf-8"))["options"]
        if not isinstance(options, dict):
            raise TypeError(f"'options' is a {type(options).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = "no 'options' key" if isinstance(e, KeyError) else _first_line(e)
        raise ConfigError(f"{stored}: unreadable ({why}). It records the training options of the run in {path}, "
                          "which a rerun compares with the command's. Restore it from a copy; or delete it, and "
                          f"the run's config.yaml is compared instead; or choose another run_dir") from None
    return options


def read_run_config(path: Path) -> DictConfig:
    """``<run_dir>/config.yaml`` as written by the run; ConfigError naming the file and what to do when it is
    not YAML or not a caldpo run's configuration."""
    file = path / "config.yaml"
    try:
        cfg = OmegaConf.load(file)
    except Exception as e:  # noqa: BLE001 - yaml's and OmegaConf's errors alike: the file cannot be read
        cfg, why = None, f"not YAML: {_first_line(e)}"
    else:
        why = "not a caldpo run's configuration (no 'model' section)"
    if isinstance(cfg, DictConfig) and "model" in cfg:
        return cfg
    fix = ("delete it, and the rerun writes it again from this command (whose training options match "
           f"{IDENTITY_FILE})" if (path / IDENTITY_FILE).exists() else "choose another run_dir")
    raise ConfigError(f"{file}: {why}. It is the configuration of the run in {path} (read by reruns and "
                      f"caldpo.plot). Restore it from a copy, or {fix}")


def check_run_dir(cfg: DictConfig, path: Path) -> dict[str, tuple[Any, Any]]:
    """Compare the run stored in ``path`` (if any) with ``cfg`` before any work.

    Raises ConfigError listing the training options that differ (old -> new), or naming an
    ``identity.json`` / ``config.yaml`` that cannot be read and what to do. Returns the other
    options that differ (non-identity ones, e.g. save_every), {} for a new run.
    """
    stored = path / IDENTITY_FILE
    if not has_trained(path):
        return {}  # a run stopped before its first step (a data or model error): nothing to protect
    if stored.exists():
        old = read_identity(path)
    elif (path / "config.yaml").exists():  # a run written before identity.json existed
        old_cfg = read_run_config(path)
        old = {k: OmegaConf.select(old_cfg, k, default="<absent>") for k in run_identity(cfg)}
        old["model.archive"] = _archive_identity(old["model.archive"]) if old["model.archive"] != "<absent>" else None
        new_arch = run_identity(cfg)["model.archive"]
        if old["model.archive"] and new_arch and old["model.archive"].split(" (")[0] == new_arch.split(" (")[0]:
            old["model.archive"] = new_arch
    else:
        return {}
    new = json.loads(json.dumps(run_identity(cfg), default=str))
    diff = {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<absent>") != new.get(k, "<absent>")}
    if diff:
        lines = "\n".join(f"    {k}: {a} -> {b}" for k, (a, b) in diff.items())
        raise ConfigError(f"run_dir={path} holds a run with other training options:\n{lines}\n"
                          "Rerun with the stored options to resume it, or choose another run_dir "
                          "(or drop run_dir= to get <local_run_root>/<exp_name>_<hash> of these options)")
    others: dict[str, tuple[Any, Any]] = {}
    if (path / "config.yaml").exists():
        old_all = _flat_all(read_run_config(path))
        new_all = _flat_all(cfg)
        others = {k: (old_all.get(k), new_all.get(k)) for k in sorted(set(old_all) | set(new_all))
                  if k not in new and old_all.get(k) != new_all.get(k)}
    return others


def _flat_all(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    for k, v in container.items():
        if isinstance(v, dict):
            out.update(_flat_all(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def has_trained(path: Path) -> bool:
    """Whether ``path`` holds anything a run wrote after its first step began (metrics, checkpoints,
    exports, DONE). A directory holding only config.yaml / identity.json / .lock is from a run that
    stopped in its setup (bad data, a model that does not fit) and protects nothing."""
    return any((path / name).exists() for name in ("metrics.jsonl", "checkpoints", "LATEST", "DONE"))


def write_run_config(cfg: DictConfig, path: Path) -> None:
    """Write ``config.yaml`` and ``identity.json`` once, when the run starts fresh; never rewrite them
    once the run has trained (:func:`has_trained`). Each is written whole (``caldpo.files.write_output``)."""
    from caldpo.files import json_text, write_output
    path.mkdir(parents=True, exist_ok=True)
    fresh = not has_trained(path)
    if fresh or not (path / "config.yaml").exists():
        write_output(path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True), "the run's configuration")
    if fresh or not (path / IDENTITY_FILE).exists():
        ident = run_identity(cfg)
        write_output(path / IDENTITY_FILE, json_text({"hash": identity_hash(ident), "options": ident}, indent=1,
                                                     default=str), "the run's identity")


# ----------------------------------------------------------------------------- help

def describe_options() -> str:
    """Every option with its default and help text, from the schema and the composed yaml defaults."""
    cfg = _compose([])
    lines = ["Options (key=value; defaults from caldpo/train/conf/config.yaml):"]

    def walk(node: DictConfig, schema: type, prefix: str) -> None:
        for f in dataclasses.fields(schema):
            if f.name in ("model", "loss") and not prefix:
                continue
            child = node._get_node(f.name)
            if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                walk(child, OmegaConf.get_type(child), f"{prefix}{f.name}.")
                continue
            value = OmegaConf.to_container(child) if isinstance(child, ListConfig) else node[f.name]
            shown = json.dumps(value).replace('"', "") if isinstance(value, (bool, list, type(None))) else value
            lines.append(f"  {prefix}{f.name}={shown}".ljust(40) + f"  {f.metadata.get('help', '')}")

    walk(cfg, Config, "")
    lines.append(f"\nmodel=<preset>: {', '.join(group_options('model'))} (conf/model/); default tiny")
    walk(cfg.model, ModelConfig, "model.")
    lines.append(f"\nloss=<name>: {', '.join(group_options('loss'))} (conf/loss/); default sft")
    for name in group_options("loss"):
        lc = _compose([f"loss={name}"]).loss
        schema = OmegaConf.get_type(lc)
        lines.append(f" {(schema.__doc__ or '').strip().splitlines()[0].replace('``', '')}")
        for f in dataclasses.fields(schema):
            if f.name != "name":
                shown = json.dumps(lc[f.name]) if isinstance(lc[f.name], bool) else lc[f.name]
                lines.append(f"  loss.{f.name}={shown}".ljust(40) + f"  {f.metadata.get('help', '')}")
    return "\n".join(lines)
