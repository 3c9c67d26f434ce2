"""Sample completions for evaluation: ``python -m caldpo.train.generate model.archive=<run>/LATEST/policy.pt ...``.

Takes the same overrides as training (model, datasets, max lengths) plus the
``generate.*`` group, and writes a JSON list of ``{"prompt", "response", "reference"}``
where the reference is the dataset's preferred (chosen / SFT target) response.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .config import ConfigError, load_config, validate


@torch.no_grad()
def generate_responses(policy, tokenizer, prompts: list[str], cfg: DictConfig, device: torch.device,
                       batch_size: int, truncation_modes: list[str] | None = None, progress: bool = False) -> list[str]:
    """Sampled responses (text after the prompt, up to EOS) for each prompt.

    Prompts are cut to ``max_prompt_length`` tokens (keeping the end for HH, the start for
    TL;DR) and left-padded. Under FSDP2 the root's parameters are unsharded for the call
    and every rank steps in lockstep (``synced_gpus``).
    """
    lm = policy.lm
    fsdp = hasattr(policy, "unshard")
    if fsdp:
        policy.unshard()
    lm.eval()
    out: list[str] = []
    mp = int(cfg.max_prompt_length)
    modes = truncation_modes or ["keep_end"] * len(prompts)
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="generate", disable=not progress):
        ids = []
        for p, mode in zip(prompts[s:s + batch_size], modes[s:s + batch_size]):
            t = tokenizer(p, add_special_tokens=False)["input_ids"]
            ids.append(t[-mp:] if mode == "keep_end" else t[:mp])
        width = max(len(t) for t in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(t)) + t for t in ids], device=device)
        mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in ids], device=device)
        gen = lm.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                          temperature=float(cfg.generate.temperature), top_p=float(cfg.generate.top_p),
                          max_new_tokens=int(cfg.max_new_tokens), pad_token_id=pad,
                          eos_token_id=tokenizer.eos_token_id, synced_gpus=fsdp and torch.distributed.get_world_size() > 1)
        out.extend(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True))
    if fsdp:
        policy.reshard()
    return out


def main(overrides: list[str] | None = None) -> Path:
    """Load the policy (``model.archive``), sample for ``generate.n_prompts`` test prompts, write JSON."""
    from .trainer import Examples
    from .model import LogProbModel, apply_archive, check_attention, load_archive_state, load_causal_lm, \
        load_tokenizer, model_path, DTYPES

    cfg = load_config(overrides)
    validate(cfg, 1)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    path = model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    lm = load_causal_lm(cfg, path, DTYPES[cfg.model.policy_dtype], check_attention(cfg, device))
    if cfg.model.archive:
        apply_archive(lm, load_archive_state(cfg.model.archive), cfg.model.archive)
    policy = LogProbModel(lm).to(device)
    items = Examples(cfg, cfg.generate.split, sft=True, verbose=True, eos=tokenizer.eos_token).items
    items = items[: int(cfg.generate.n_prompts)]
    responses = generate_responses(policy, tokenizer, [it[0] for it in items], cfg, device,
                                   int(cfg.generate.batch_size), [it[3] for it in items], progress=True)
    rows = [{"prompt": it[0], "response": r, "reference": it[1]} for it, r in zip(items, responses)]
    if cfg.generate.output:
        out = Path(cfg.generate.output)
    elif cfg.model.archive:
        out = Path(cfg.model.archive).resolve().parent.parent / "samples.json"
    else:
        out = Path(cfg.local_run_root) / f"samples_{cfg.exp_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    print(f"wrote {len(rows)} samples to {out}", flush=True)
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"caldpo: config error: {e}", file=sys.stderr)
        sys.exit(2)
