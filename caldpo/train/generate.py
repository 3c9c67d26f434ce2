"""Generate responses for evaluation: ``python -m caldpo.train.generate model.archive=<run>/LATEST/policy.pt ...``.

Takes the same overrides as training (model, datasets, seed) plus ``max_new_tokens`` and
the ``generate.*`` group, and writes a JSON list of ``{"prompt", "response", "reference"}``
in dataset order, where the reference is the dataset's preferred (chosen / SFT target)
response. Defaults follow the authors' ``generate.py``: greedy decoding
(``generate.temperature=0``), 100 new tokens, every prompt of the split
(``generate.n_prompts=null``), ``eval_batch_size`` prompts per call, prompts not cut.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .batches import encode_prompt, prompt_cue_tokens, truncate_prompt
from .config import ConfigError, load_config, validate


def prompt_ids_for_generation(prompts: list[str], tokenizer, modes: list[str], limit: int | None) -> list[list[int]]:
    """Prompt token ids as training tokenizes them; cut only when longer than ``limit``
    (the model's positions minus ``max_new_tokens``), by ``batches.truncate_prompt`` keeping
    the prompt's final cue (``prompt_cue_tokens``: ``"\\nTL;DR:"`` survives a keep_start cut)."""
    out = []
    for prompt, mode in zip(prompts, modes):
        ids, offsets = encode_prompt(prompt, tokenizer)
        if limit is not None and len(ids) > limit:
            ids = truncate_prompt(ids, limit, mode, keep_last=prompt_cue_tokens(prompt, offsets, limit))
        out.append(ids)
    return out


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], cfg: DictConfig, device: torch.device,
                       batch_size: int, truncation_modes: list[str] | None = None, progress: bool = False,
                       sources: list[str] | None = None) -> list[str]:
    """Responses (text after the prompt, up to EOS) for each prompt, in the order of ``prompts``.

    ``model`` is a ``LogProbModel`` (its ``.lm`` generates). Decoding: greedy when
    ``cfg.generate.temperature`` is 0, else sampling with that temperature and
    ``cfg.generate.top_p``; ``cfg.max_new_tokens`` new tokens at most. The random stream is
    seeded with ``cfg.seed`` inside a forked RNG, so output is reproducible and training's
    RNG is untouched. Prompts are not cut unless prompt + ``max_new_tokens`` exceeds the
    model's positions (``prompt_ids_for_generation``). Batches of ``batch_size`` prompts
    sorted by length (less padding), left-padded. Under FSDP2 the root's parameters are
    unsharded for the call and every rank steps in lockstep (``synced_gpus``). A prompt id the
    model's embedding cannot hold raises ``model.TokenIdError`` naming the prompt (``sources``: each
    prompt's dataset file:line) before anything is generated.
    """
    from .model import check_token_ids, embedding_rows, max_positions

    if not prompts:
        return []
    lm = model.lm
    max_new = cfg.max_new_tokens
    check_options(cfg)
    temperature = cfg.generate.temperature
    positions = max_positions(lm.config)
    limit = None
    if positions is not None:
        limit = positions - max_new
        if limit < 1:
            raise ConfigError(f"max_new_tokens={max_new} leaves no room for a prompt in the model's "
                              f"{positions} positions; lower max_new_tokens")
    modes = truncation_modes or ["keep_end"] * len(prompts)
    ids = prompt_ids_for_generation(prompts, tokenizer, modes, limit)
    rows = embedding_rows(lm)
    for i, p in enumerate(ids):  # before any generation: an index error (a CUDA assert) would name nothing
        src = sources[i] if sources and sources[i] else ""
        check_token_ids(torch.tensor([p], dtype=torch.long), rows, lambda _: f"prompt {i}" + (f" ({src})" if src else ""))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": cfg.generate.top_p} \
        if temperature > 0 else {"do_sample": False}
    fsdp = hasattr(model, "unshard")
    synced = fsdp and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    was_training = lm.training
    out: list[str | None] = [None] * len(prompts)
    if fsdp:
        model.unshard()
    lm.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            for s in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
                chunk = order[s:s + batch_size]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in chunk], device=device)
                gen = lm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new,
                                  pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                                  synced_gpus=synced, **sampling)
                for i, text in zip(chunk, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
                    out[i] = text
    finally:
        lm.train(was_training)
        if fsdp:
            model.reshard()
    return out


def check_options(cfg: DictConfig) -> None:
    """ConfigError naming the ``generate.*`` option whose value cannot run: ``temperature`` < 0,
    ``n_prompts`` or ``batch_size`` < 1 (null: every prompt / ``eval_batch_size``), ``top_p`` outside
    (0, 1] when sampling. Called before the model loads and by :func:`generate_responses`."""
    g = cfg.generate
    if g.temperature < 0:
        raise ConfigError(f"generate.temperature={g.temperature}: must be >= 0 (0: greedy)")
    if g.n_prompts is not None and g.n_prompts < 1:
        raise ConfigError(f"generate.n_prompts={g.n_prompts}: must be >= 1 (null: every prompt of the split)")
    if g.batch_size is not None and g.batch_size < 1:
        raise ConfigError(f"generate.batch_size={g.batch_size}: must be >= 1 (null: eval_batch_size)")
    if g.temperature > 0 and not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p={g.top_p}: must be in (0, 1] when sampling (1: no nucleus cut)")


def output_path(cfg: DictConfig) -> Path:
    """Where ``main`` writes: ``generate.output``, else ``<run_dir>/samples.json`` of ``model.archive``'s run,
    else ``<local_run_root>/samples_<exp_name>.json``."""
    if cfg.generate.output:
        return Path(cfg.generate.output)
    if cfg.model.archive:
        return Path(cfg.model.archive).resolve().parent.parent / "samples.json"
    return Path(cfg.local_run_root) / f"samples_{cfg.exp_name}.json"


def main(overrides: list[str] | None = None) -> Path:
    """Load the policy (``model.archive``), generate for ``generate.n_prompts`` prompts, write JSON.

    The destination is checked before the model loads (``caldpo.files.check_writable``) and written whole
    at the end (``write_output``: a temporary file renamed over it), so a failed write never leaves a
    partial or emptied ``samples.json``, and an unwritable destination costs no generation."""
    from caldpo.files import check_writable, json_text, write_output

    from .schedule import Examples
    from .model import LogProbModel, apply_archive, check_attention, check_vocab_and_positions, load_archive_state, \
        load_causal_lm, load_tokenizer, model_path, DTYPES

    cfg = load_config(overrides)
    validate(cfg, 1, training=False)  # the preflight without the trainer-only checks
    check_options(cfg)
    out = check_writable(output_path(cfg), "generate.output")
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    path = model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    check_vocab_and_positions(cfg, tokenizer, path, positions=False)
    lm = load_causal_lm(cfg, path, DTYPES[cfg.model.policy_dtype], check_attention(cfg, device))
    if cfg.model.archive:
        apply_archive(lm, load_archive_state(cfg.model.archive), cfg.model.archive)
    policy = LogProbModel(lm).to(device)
    items = Examples(cfg, cfg.generate.split, sft=True, verbose=True).items
    if cfg.generate.n_prompts is not None:
        items = items[: cfg.generate.n_prompts]
    batch_size = int(cfg.generate.batch_size or cfg.eval_batch_size)
    responses = generate_responses(policy, tokenizer, [it.prompt for it in items], cfg, device, batch_size,
                                   [it.truncation_mode for it in items], progress=True,
                                   sources=[getattr(it, "source", "") for it in items])
    rows = [{"prompt": it.prompt, "response": r, "reference": it.chosen} for it, r in zip(items, responses)]
    write_output(out, json_text(rows, indent=1, ensure_ascii=False), "samples")
    print(f"wrote {len(rows)} samples to {out}", flush=True)
    return out


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nOptions: the training options (caldpo/train/conf/config.yaml), chiefly "
              "model=..., model.archive=..., datasets=[...], max_new_tokens, eval_batch_size, seed, and "
              "generate.{split,n_prompts,batch_size,temperature,top_p,output}.\n"
              "Example: python -m caldpo.train.generate model=pythia28 datasets=[hh] "
              "model.archive=<the printed path, e.g. runs/<exp_name>_<hash8>/LATEST/policy.pt>")
        return 0
    from caldpo.cli import run

    def work() -> None:
        main(argv)

    return run(work)


if __name__ == "__main__":
    from caldpo.cli import main as _main

    _main(cli)
