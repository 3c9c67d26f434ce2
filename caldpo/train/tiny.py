"""A tiny Pythia-shaped model and tokenizer, built locally (no model hub needed).

Tests and smoke runs need a real Hugging Face checkpoint with Pythia's
structure (GPT-NeoX, partial rotary, parallel residual, untied head, one
"<|endoftext|>" special token as bos/eos/unk) but must not download anything.
`build_tiny` trains a byte-level BPE tokenizer on the shipped sample plus a
generic ASCII corpus (the byte alphabet makes any text encodable), and saves a
randomly initialised `GPTNeoXForCausalLM`. Same arguments give byte-identical
files. `tiny_model_dir` builds once into a cache and is safe under concurrency.

CLI: `python -m caldpo.train.tiny --out DIR`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import string
import tempfile

from caldpo.train.sample import sample_path

# Bump when the build changes in a way the arguments do not capture.
BUILD_VERSION = 1
EOS = "<|endoftext|>"
VOCAB_MULTIPLE = 8

GENERIC_CORPUS = "\n".join([
    string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation,
    "The quick brown fox jumps over the lazy dog. A big black bug bit a big black bear.",
    "Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 32 64 100 128 256 512 1000 2024",
    "SUBREDDIT: r/AskReddit\nTITLE: A short title\nPOST: A short post.\nTL;DR: a summary.",
    "(a + b) * c = d; e/f - g % h < i > j [k] {l} 'm' \"n\" `o` ~p ^q |r| @s #t $u &v _w",
    "\t  \n\n  indented\ttabs and  double  spaces\r\n",
])

DEFAULTS = dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                max_position_embeddings=2048, seed=0)  # Pythia's context: the default max_length=512 fits


def _training_texts() -> list[str]:
    """Every sample dialogue (both splits, both sides) plus the generic corpus."""
    texts = [GENERIC_CORPUS]
    for split in ("train", "test"):
        with open(sample_path(split), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [row["chosen"], row["rejected"]]
    return texts


def build_tokenizer(vocab_size: int = 512, model_max_length: int = 256):
    """A byte-level BPE `PreTrainedTokenizerFast` like Pythia's, trained locally."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[EOS],  # id 0, as in Pythia
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
        model_max_length=model_max_length,
    )
    fast.pad_token = fast.eos_token  # what the reference code does for Pythia
    return fast


def build_tiny(out_dir, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               vocab_size: int = 512, max_position_embeddings: int = 256,
               seed: int = 0) -> pathlib.Path:
    """Build the tokenizer and a randomly initialised GPT-NeoX model into `out_dir`.

    `vocab_size` is the BPE target; the model's embedding is padded up to a
    multiple of 8 as Pythia's is (its rows beyond the tokenizer are never targets).
    """
    import torch
    from transformers import GPTNeoXForCausalLM

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, max_position_embeddings)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out / "tokenizer_config.json")
    n_tok = len(tokenizer)
    eos_id = tokenizer.eos_token_id
    config = neox_config(vocab_size=-(-n_tok // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, hidden_size=hidden_size,
                         num_layers=num_layers, num_heads=num_heads,
                         max_position_embeddings=max_position_embeddings, eos_id=eos_id)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).float().eval()
    _save_quietly(model, out)
    return out


def neox_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                max_position_embeddings: int, eos_id: int):
    """A `GPTNeoXConfig` with Pythia's structure (EleutherAI/pythia-*/config.json): partial rotary
    (rotary_pct 0.25, base 10000), parallel residual, untied head, FFN 4 x hidden, GELU; no dropout."""
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _save_quietly(model, out: pathlib.Path) -> None:
    """`save_pretrained` without transformers' progress bars."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _portable_tokenizer_config(path: pathlib.Path) -> None:
    """Name the class every transformers version loads (4.x lacks `TokenizersBackend`)."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_random(out_dir, *, vocab: int, hidden_size: int, num_layers: int, num_heads: int,
                 max_position_embeddings: int = 2048, device: str = "cpu", dtype: str = "float32",
                 seed: int = 0) -> pathlib.Path:
    """A Pythia-shaped GPT-NeoX of any size with random weights, built fast, and the tiny build's tokenizer.

    For GPU benchmarks at billions of parameters (Pythia-2.8B: 2.78e9 parameters, 5.6 GB in bf16):
    the model is built from its config directly on ``device`` (e.g. ``"cuda"``) in ``dtype``
    (``"bfloat16"``) and saved once as safetensors in that dtype, with no fp32 copy on the host;
    on the CPU in fp32 it is the benchmarks' widened model. The embedding has
    ``vocab`` rows (Pythia: 50304); the tokenizer is ``build_tokenizer``'s 512 tokens, so the rows
    beyond it are never targets. Returns ``out_dir``; the model leaves no memory on ``device``.
    """
    import torch
    from transformers import GPTNeoXForCausalLM

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(512, max_position_embeddings)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out / "tokenizer_config.json")
    config = neox_config(vocab_size=vocab, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         max_position_embeddings=max_position_embeddings, eos_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    _save_quietly(model, out)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def _default_cache() -> pathlib.Path:
    env = os.environ.get("CALDPO_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "caldpo"


def _build_key(kwargs: dict) -> str:
    """Hash of the build arguments, build version, library versions and sample text."""
    import tokenizers
    import transformers

    versions = {"v": BUILD_VERSION, "tokenizers": tokenizers.__version__,
                "transformers": transformers.__version__}
    h = hashlib.sha256(json.dumps({**versions, **kwargs}, sort_keys=True).encode())
    for split in ("train", "test"):
        h.update(sample_path(split).read_bytes())
    return h.hexdigest()[:16]


def tiny_model_dir(cache_dir=None, **build_kwargs) -> pathlib.Path:
    """Return the cached tiny model folder, building it on first use.

    The build goes to a private temporary folder that is renamed into place, so
    concurrent callers never see a half-written model; the loser of a race
    discards its copy. `build_kwargs` override `build_tiny`'s defaults.
    """
    unknown = set(build_kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown build arguments: {sorted(unknown)}")
    kwargs = {**DEFAULTS, **build_kwargs}
    cache = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache()
    final = cache / f"tiny-pythia-{_build_key(kwargs)}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    os.chmod(tmp, 0o755)
    try:
        build_tiny(tmp, **kwargs)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the tiny Pythia-shaped model and tokenizer.")
    p.add_argument("--out", required=True, help="output folder")
    for name, default in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    args = vars(p.parse_args(argv))
    print(build_tiny(args.pop("out"), **args))


if __name__ == "__main__":
    main()
