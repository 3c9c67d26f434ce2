"""Models: presets and loading, the hidden-state forward with the fused head, FSDP2 wrapping.

The backbone returns hidden states; ``caldpo.kernels.sequence_logprobs`` applies the
output head, log-softmax and gather in one fused op, so no training path builds
``[tokens x vocab]`` logits. The head is called inside the root module's forward:
under FSDP2 that is where the root's parameters (embeddings, head) are unsharded.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from caldpo.hf import from_pretrained
from caldpo.kernels import KernelOptions, linear_logprobs, sequence_logprobs

from .attention import NAME, SEGMENTS_KWARG, full_mask, hf_implementation
from .config import ConfigError
from .layout import PackedBatch, segment_sum
from .output_head import OutputHead, output_head

log = logging.getLogger("caldpo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_path(cfg: DictConfig) -> str:
    """Where the weights come from: a hub name, a local directory, or the tiny local build."""
    if cfg.model.preset == "tiny" and cfg.model.name_or_path is None:
        from .tiny import tiny_model_dir
        return str(tiny_model_dir())
    return str(cfg.model.name_or_path)


def _where(cfg: DictConfig, path: str) -> str:
    """The options that chose the model (and tokenizer), for messages."""
    where = f"model.name_or_path={path}" if cfg.model.name_or_path else f"model={cfg.model.preset} ({path})"
    if cfg.model.tokenizer_name_or_path:
        where += f" with model.tokenizer_name_or_path={cfg.model.tokenizer_name_or_path}"
    return where


def _load_failed(cfg: DictConfig, path: str, what: str, e: BaseException) -> ConfigError:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return ConfigError(f"{_where(cfg, path)}: the {what} does not load ({type(e).__name__}: {first[:300]}); "
                       "check that the folder is a complete save_pretrained output (or the hub name is right)")


def load_tokenizer(cfg: DictConfig, path: str):
    """The tokenizer (pad = EOS when it has no pad token); ConfigError when it does not load."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_name_or_path or path,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types for one cause: a bad folder
        raise _load_failed(cfg, path, "tokenizer", e) from None
    if tok.pad_token_id is None:
        tok.pad_token_id = tok.eos_token_id
    return tok


def _model_class(cfg: DictConfig):
    """The transformers class ``AutoModelForCausalLM`` would build for this config, or None when
    it cannot be told without loading (remote code, an unknown config)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(model_path(cfg), trust_remote_code=cfg.model.trust_remote_code)
        return AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:
        return None


def check_attention(cfg: DictConfig, device: torch.device) -> str:
    """The attention implementation to use: ``auto`` picks flash-attn on CUDA when it is installed
    and the model class supports it, else SDPA when the class supports it (its ``_supports_sdpa``:
    Gemma-2 does not, its attention soft-cap needs eager), else eager, with a log line; an
    explicit ``flash_attention_2`` or ``sdpa`` that cannot run is an error, never a silent fallback.
    ``varlen`` (segment attention, ``attention.py``) needs what SDPA needs and a model without a
    sliding window or attention soft-cap; whether packed rows then run as segments is
    ``attention.packed_attention``'s choice, once the layout is known."""
    impl = cfg.model.attn_implementation
    cls = _model_class(cfg)
    if impl == "varlen":
        if cls is not None and not getattr(cls, "_supports_sdpa", False):
            raise ConfigError(f"model.attn_implementation=varlen: {cls.__name__} does not support SDPA in this "
                              "transformers (the varlen path runs SDPA for padded rows); use auto or eager")
        from transformers import AutoConfig

        from .attention import unsupported
        try:
            why = unsupported(AutoConfig.from_pretrained(model_path(cfg), trust_remote_code=cfg.model.trust_remote_code))
        except OSError:
            why = None
        if why:
            raise ConfigError(f"model.attn_implementation=varlen: the model has {why}; use sdpa")
        return impl
    if impl == "auto":
        if (device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
                and (cls is None or getattr(cls, "_supports_flash_attn", False))):
            return "flash_attention_2"
        if cls is None or getattr(cls, "_supports_sdpa", False):
            return "sdpa"
        log.info("model.attn_implementation=auto: %s does not support SDPA; using eager attention", cls.__name__)
        return "eager"
    if impl == "sdpa" and cls is not None and not getattr(cls, "_supports_sdpa", False):
        raise ConfigError(f"model.attn_implementation=sdpa: {cls.__name__} does not support SDPA in this "
                          "transformers; use model.attn_implementation=auto (or eager)")
    if impl == "flash_attention_2":
        if device.type != "cuda":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a CUDA device; "
                              "use model.attn_implementation=sdpa on CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                              "pip install 'caldpo[flash]' or use model.attn_implementation=sdpa")
    return impl


def _zero_dropout_config(config) -> None:
    """Set every dropout-like probability of a transformers config (and its sub-configs) to 0.

    Keys holding ``drop`` (``hidden_dropout``, ``attention_dropout``, ``resid_pdrop``,
    ``layerdrop``, ``drop_path_rate``, ...) with a positive number are zeroed."""
    from transformers import PretrainedConfig
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_dropout_config(value)
        elif "drop" in key.lower() and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            setattr(config, key, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere, as the reference code's ``disable_dropout``: every ``nn.Dropout*``
    gets ``p = 0`` and every float module attribute named ``*drop*`` (the probability that
    attention kernels read, e.g. ``attention_dropout``) is set to 0."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if "drop" in key.lower() and isinstance(value, float) and value > 0:
                setattr(m, key, 0.0)


def load_causal_lm(cfg: DictConfig, path: str, dtype: torch.dtype, attn: str) -> nn.Module:
    """A causal LM with dropout disabled (config probabilities and modules, see ``disable_dropout``):
    the reference code trains and evaluates the policy and the reference without dropout, so at
    step 1 with policy = reference every reward is 0 whatever the model config says.
    ``attn``: caldpo's attention choice; "sdpa" and "varlen" load ``attention.NAME`` where the model
    can take it (``attention.hf_implementation``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    trust = cfg.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as e:  # a config transformers refuses
        raise _load_failed(cfg, path, "model", e) from None
    _zero_dropout_config(config)
    try:  # sdpa and varlen load caldpo's registered attention (attention.py): SDPA plus segments
        impl = hf_implementation(attn, config)
    except ValueError as e:
        raise ConfigError(f"model.attn_implementation={attn}: {e}") from None
    try:
        model = from_pretrained(AutoModelForCausalLM, path, config=config, dtype=dtype, attn_implementation=impl,
                                trust_remote_code=trust, low_cpu_mem_usage=True)
    except (OSError, ValueError) as e:  # a missing or unreadable weights file
        raise _load_failed(cfg, path, "model", e) from None
    disable_dropout(model)
    model.config.use_cache = False
    return model


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(config) -> int | None:
    """The longest sequence the model declares (its position table, or for rotary models the
    context it was trained for): the first of ``POSITION_KEYS`` set on its text config; None
    when it declares none (then nothing is checked)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_vocab_and_positions(cfg: DictConfig, tokenizer, path: str, *, positions: bool = True) -> None:
    """Config errors, before any data or weights load, naming both sizes, when:

    * the tokenizer has no EOS token (every response ends with it; found here, not while tokenizing);
    * a token id can fall outside the output head's rows: the tokenizer's largest id
      (added tokens included) or its pad / EOS id >= the model's ``vocab_size``;
    * ``max_length`` exceeds the model's declared positions (``max_positions``). A model
      with a learned position table fails with an index error there; a rotary model would
      run out of the context it was trained for. A model that declares no limit is not checked.
      ``positions=False`` (generation, which fits prompts to the positions itself) skips this.
    """
    from transformers import AutoConfig
    where = _where(cfg, path)
    if tokenizer.eos_token_id is None:
        tok_dir = cfg.model.tokenizer_name_or_path or path
        raise ConfigError(f"{where}: the tokenizer has no EOS token (no eos_token in {tok_dir}/tokenizer_config.json): "
                          "caldpo ends every response with EOS, as the reference code does, and generation stops "
                          "at it. Set eos_token there (e.g. the model's end-of-text token), or use a tokenizer "
                          "that has one (model.tokenizer_name_or_path=)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _load_failed(cfg, path, "model config", e) from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        largest, special = tokenizer_ids(tokenizer)
        bad = {k: v for k, v in special.items() if v >= vocab}
        if largest >= vocab or bad:
            ids = ", ".join(f"{k} id {v}" for k, v in bad.items())
            raise ConfigError(
                f"{where}: the tokenizer has {len(tokenizer)} tokens (largest id {largest}{', ' + ids if ids else ''}) "
                f"but the model's output head has {vocab} rows (vocab_size={vocab}): ids >= {vocab} have no logit. "
                "Use the model's own tokenizer, or resize the model to the tokenizer "
                "(model.resize_token_embeddings(len(tokenizer)), then save_pretrained) and train that")
    limit = max_positions(config) if positions else None
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"max_length={cfg.max_length} exceeds the {limit} positions of {where} "
                          f"(max_position_embeddings={limit}); set max_length<={limit} "
                          f"(and max_prompt_length below it)")


def tokenizer_ids(tokenizer) -> tuple[int, dict[str, int]]:
    """The largest id ``tokenizer`` can produce (added tokens included) and its pad / EOS ids (those set)."""
    largest = max(len(tokenizer) - 1, max(tokenizer.get_vocab().values(), default=-1))
    special = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id}
    return largest, {k: v for k, v in special.items() if v is not None}


def load_archive_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state`` of a reference-format ``policy.pt`` (loaded with weights_only=True).

    Checked first (``checkpoint.verify_archive``): against the ``MANIFEST.json`` beside it when
    there is one, and the CRC of every record of the file. Raises ConfigError naming the file and
    the reason for a truncated, damaged or non-checkpoint file, or one holding non-finite weights.
    """
    import pickle

    from .checkpoint import CheckpointError, non_finite, verify_archive
    hint = "use the LATEST/policy.pt a finished caldpo run wrote (or the reference code's policy.pt)"
    try:
        verify_archive(Path(path))
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise ConfigError(f"model.archive={path}: not a readable policy.pt: {e}; {hint}") from None
    except pickle.UnpicklingError as e:
        raise ConfigError(f"model.archive={path}: holds objects other than tensors and plain types "
                          f"({str(e).splitlines()[0][:160]}); refusing to unpickle it; {hint}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"model.archive={path}: not a readable policy.pt ({str(e).splitlines()[0][:160]}); "
                          f"{hint}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state"), dict):
        raise ConfigError(f"model.archive={path}: not a policy.pt checkpoint (no 'state' dict); {hint}")
    bad = non_finite(blob["state"])
    if bad:
        raise ConfigError(f"model.archive={path}: {len(bad)} tensors hold NaN/Inf (e.g. {bad[:3]}); {hint}")
    return blob["state"]


def apply_archive(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load an archive's state into ``model``; ConfigError when it is another model's (names or shapes)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists every one
        sizes = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln][:3]
        raise ConfigError(f"model.archive={path} was saved from another model than {model.config.name_or_path} "
                          f"({'; '.join(sizes) or str(e).splitlines()[0]}); pass the model= / model.name_or_path= "
                          "the archive was trained with") from None
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ConfigError(f"model.archive={path} does not match model {model.config.name_or_path}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")


class TokenIdError(ConfigError):
    """A token id the model's input embedding has no row for (exit status 2, as a config error).

    ``token``: the id; ``rows``: the embedding's rows; ``where``: which sequence (and, when known,
    its dataset file:line). The preflight (``check_vocab_and_positions``) compares the tokenizer
    with the config's ``vocab_size``; this is the check of the loaded embedding itself, on the
    forward and generation paths, before an index error (or a CUDA device-side assert) would.
    """

    def __init__(self, token: int, rows: int, where: str):
        self.token, self.rows, self.where = token, rows, where
        super().__init__(
            f"token id {token} in {where} is outside the model's input embedding ({rows} rows, ids 0..{rows - 1}): "
            "the tokenizer does not match the model. Use the model's own tokenizer (model.tokenizer_name_or_path), "
            "or resize the model to the tokenizer (model.resize_token_embeddings(len(tokenizer)), then "
            "save_pretrained) and train that")


def embedding_rows(lm: nn.Module) -> int | None:
    """Rows of ``lm``'s input embedding (the ids it can look up), or None when it has none to ask."""
    try:
        emb = lm.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(emb, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def check_embedding_covers_tokenizer(lm: nn.Module, tokenizer) -> None:
    """TokenIdError when the loaded input embedding has no row for an id ``tokenizer`` can produce (its
    largest id, pad or EOS). ``check_vocab_and_positions`` compared the config's ``vocab_size`` before
    loading; this compares the loaded weights, once, so no example's ids need scanning and no forward
    can meet an id outside the embedding."""
    rows = embedding_rows(lm)
    largest, special = tokenizer_ids(tokenizer)
    top = max(largest, *special.values())
    if rows is not None and top >= rows:
        name = next((f"the tokenizer's {k} id" for k, v in special.items() if v == top), "the tokenizer's largest id")
        raise TokenIdError(top, rows, f"{name} ({len(tokenizer)} tokens)")


def check_token_ids(ids: torch.Tensor, rows: int | None, row_name: Callable[[int], str]) -> None:
    """Raise TokenIdError for the first id of ``ids`` ([B, T] int64) outside ``[0, rows)``, naming the id,
    ``rows``, ``row_name(row)`` (which sequence; its dataset file:line when the caller knows it) and the
    position. Host tensors only (one reduction, no synchronization): ids already on an accelerator are
    not checked here, so the training step never waits on one; the trainer checks the tokenizer against
    the loaded embedding once (``check_embedding_covers_tokenizer``)."""
    if rows is None or ids.numel() == 0 or ids.device.type != "cpu":
        return
    bad = (ids < 0) | (ids >= rows)
    if not bool(bad.any()):
        return
    r, t = (int(x) for x in bad.nonzero()[0].tolist())
    raise TokenIdError(int(ids[r, t]), rows, f"{row_name(r)}, position {t}")


class LogProbModel(nn.Module):
    """A causal LM whose forward returns per-sequence response log-probs via the fused head."""

    def __init__(self, lm: nn.Module, backend: str = "auto", head: OutputHead | None = None,
                 options: KernelOptions | None = None):
        """``head``: the model's output head (bias, logit scale, soft-cap); by default read from
        the model and checked against its own forward by ``output_head``, which raises ConfigError
        for a head the fused kernels cannot reproduce. ``options``: the kernel settings passed on
        every call (caldpo.kernels.KernelOptions; None: the defaults); a ``backend`` other than
        "auto" overrides ``options.backend``."""
        super().__init__()
        self.lm = lm
        self.backend = backend
        self.options = options if options is not None else KernelOptions()
        self.head = head if head is not None else output_head(lm)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, average_log_prob: bool = False,
                packed: PackedBatch | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence log-probs [B] float32 of padded rows (input_ids, labels: [B,T]), or [S] of a
        ``layout.PackedBatch`` (``packed``: its rows and position ids run through the backbone with
        its segments (``attention.segment_attention``) or its 4D mask; ``packed_logprobs`` scores
        its head index).

        attention_mask: [B,T] of padded rows, or None when every row's tokens come first (right
        padding or none): the backbone then runs causal attention with no mask
        (``attention.full_mask``), which is exact for every scored position and lets SDPA use its
        flash kernel. kept: the head's scored positions of padded rows (``sequence_logprobs``'s
        ``kept``, known to the collator), so that the head needs no host sync.
        Raises ValueError for a batch laid out as segments on a model without ``attention.NAME``.
        """
        hidden = self.backbone(input_ids, attention_mask, packed)
        weight = self.lm.get_output_embeddings().weight
        if packed is not None:
            return self.packed_logprobs(hidden, weight, packed, average_log_prob)
        return sequence_logprobs(hidden, weight, labels, average_log_prob=average_log_prob, backend=self.backend,
                                 options=self.options, kept=kept, **self.head.kwargs(self.lm))

    def backbone(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 packed: PackedBatch | None = None) -> torch.Tensor:
        """The last hidden states [rows, length, H] of padded rows or of a ``PackedBatch`` (``forward``'s
        inputs and rules: segments, a 4D mask, or no mask for right-padded rows)."""
        rows = embedding_rows(self.lm)
        if packed is not None:
            check_token_ids(packed.input_ids, rows, lambda r: f"packed row {r} of the micro-batch")
            attn = self.lm.config._attn_implementation
            ids = packed.input_ids
            if packed.as_segments:
                if attn != NAME:
                    raise ValueError(f"a micro-batch laid out as attention segments needs the model loaded with "
                                     f"attn_implementation={NAME!r} (caldpo.train.attention), not {attn!r}")
                out = self.lm.base_model(input_ids=ids, position_ids=packed.position_ids,
                                         attention_mask=full_mask(ids.shape[0], ids.shape[1], ids.device),
                                         **{SEGMENTS_KWARG: packed.segments()})
            else:
                out = self.lm.base_model(input_ids=ids, position_ids=packed.position_ids,
                                         attention_mask=packed.attention_mask(attn, self.lm.dtype))
        else:
            check_token_ids(input_ids, rows, lambda r: f"padded row {r} of the micro-batch (chosen rows first, then rejected)")
            if attention_mask is None:
                attention_mask = full_mask(input_ids.shape[0], input_ids.shape[1], input_ids.device)
            out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def packed_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, packed: PackedBatch,
                        average_log_prob: bool = False) -> torch.Tensor:
        """The head on a packed layout: gather the hidden rows of ``packed.rows`` (a row may be
        listed twice, e.g. the last shared prompt row of a prefix-shared pair), score each against
        its target with ``linear_logprobs``, and sum (or average) per sequence -> [S] float32.
        Every listed row is scored, so the head's index is ``arange`` (no search, no host sync)."""
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.rows)
        every = torch.arange(flat.shape[0], device=flat.device)
        tok = linear_logprobs(flat, weight, packed.targets, backend=self.backend, options=self.options,
                              kept=every, **self.head.kwargs(self.lm))
        return segment_sum(tok, packed.sequence, packed.n_sequences, average=average_log_prob)


def transformer_blocks(lm: nn.Module, block_name: str | None) -> list[nn.Module]:
    """The transformer blocks FSDP2 shards and activation checkpointing wraps.

    ``block_name`` null: the classes of the model's ``_no_split_modules`` (a list in
    transformers 4, a set in 5) that occur in it. Raises ConfigError when none does.
    """
    if block_name is None:
        present = {type(m).__name__ for m in lm.modules()}
        names = sorted(n for n in (getattr(lm, "_no_split_modules", None) or ()) if n in present)
        if not names:
            raise ConfigError("model.block_name: cannot infer the transformer block class; set it")
    else:
        names = [block_name]
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"model.block_name={block_name}: no module of that class in the model")
    return blocks


def apply_activation_checkpointing(lm: nn.Module, block_name: str | None) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac, checkpoint_wrapper)
    classes = {type(b) for b in transformer_blocks(lm, block_name)}
    apply_ac(lm, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: type(m) in classes)


def shard(model: LogProbModel, cfg: DictConfig, mesh, *, trainable: bool) -> LogProbModel:
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings + head stay in the root).

    The policy (``trainable``) gets ``MixedPrecisionPolicy(param_dtype=model.fsdp_policy_mp,
    reduce_dtype=fp32)`` when ``model.fsdp_policy_mp`` is set. The reference gets no
    mixed-precision policy: it stores and computes in the dtype it was loaded in,
    ``model.reference_dtype`` (fp16 for Pythia), as the authors' trainer runs it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = None
    if cfg.model.fsdp_policy_mp is not None and trainable:
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.model.fsdp_policy_mp], reduce_dtype=torch.float32)
    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    for block in transformer_blocks(model.lm, cfg.model.block_name):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def count_matmul_params(lm: nn.Module) -> tuple[int, int, int, int]:
    """(matmul params, layers, hidden size, vocab) for FLOP counting (6 x params per token).

    Matmul params: every parameter except the embedding tables (``nn.Embedding``: tokens and
    learned positions are lookups), plus the output head's weight, counted once, also when it
    is tied to the input embedding (the head is a [V, H] matmul either way).
    """
    cfg = lm.config
    lookups = {id(p) for m in lm.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    n = sum(p.numel() for p in lm.parameters() if id(p) not in lookups)
    head = lm.get_output_embeddings()
    if head is not None and id(head.weight) in lookups:
        n += head.weight.numel()
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    return n, layers, hidden, getattr(cfg, "vocab_size", 0)
