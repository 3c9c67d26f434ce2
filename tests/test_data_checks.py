"""Checks before and at load: dropout off, vocabulary and positions, tokenization of every example.

* dropout: a model config with dropout 0.1 loads with every dropout off; at step 1 with
  policy = reference DPO's loss is ln 2 and every reward 0;
* vocabulary / positions: token ids beyond the head and max_length beyond the model's
  positions are config errors naming both sizes, raised before any data is tokenized;
* load-time tokenization: pairs identical after truncation are dropped and counted; text the
  tokenizer cannot encode and text holding EOS name their file:line, or are skipped and
  counted with on_error=skip; a dataset smaller than one batch is a config error.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from _data_fixtures import EOS, char_tokenizer, hh, write_jsonl
from conftest import TINY, read_metrics, run_train
from caldpo.train.batches import Example, ExampleError, tokenize_dataset, tokenized
from caldpo.train.config import ConfigError, load_config
from caldpo.train.data import DataError

PROMPT = "\n\nHuman: What is two plus two?\n\nAssistant:"


def _tokenizer():
    from caldpo.train.tiny import build_tokenizer
    return build_tokenizer()


def _save(tmp_path, name, config, tokenizer=None):
    out = tmp_path / name
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _cli(capsys, argv):
    """``python -m caldpo.train`` in this process (for runs that must stop before training)."""
    from caldpo.train.__main__ import cli
    capsys.readouterr()
    rc = cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _model_cfg(**over):
    kw = {"model.trust_remote_code": False}
    kw.update(over)
    return load_config(["model=hf", "model.name_or_path=x", *[f"{k}={v}" for k, v in kw.items()]])


# ----------------------------------------------------------------------------- dropout


def _dropout_models(tmp_path, vocab):
    from transformers import GPT2Config, GPTNeoXConfig
    neox = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, attention_dropout=0.1, hidden_dropout=0.1,
                         tie_word_embeddings=False)
    gpt2 = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return {"neox": neox, "gpt2": gpt2}


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
def test_loaded_model_has_no_dropout(tmp_path, arch):
    from transformers import AutoModelForCausalLM
    from caldpo.train.model import LogProbModel, load_causal_lm
    config = _dropout_models(tmp_path, 64)[arch]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    lm = load_causal_lm(_model_cfg(), str(tmp_path / arch), torch.float32, "sdpa")
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in lm.modules())
    model = LogProbModel(lm, "torch").train()
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    a, b = model(ids, mask, labels), model(ids, mask, labels)
    model.eval()
    c = model(ids, mask, labels)
    assert torch.equal(a, b) and torch.equal(a, c)  # train mode computes what eval mode computes
    # the model's own logits in float64 give the same sums (dropout off in HF's forward too)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    expected = (logp * (labels[:, 1:] != -100)).sum(-1)
    assert torch.allclose(c.double(), expected, rtol=1e-5)


def test_dpo_step_one_is_ln2_with_dropout_config(tmp_path):
    """A GPT-NeoX config with attention and hidden dropout 0.1: step-1 DPO loss ln 2, rewards 0."""
    from transformers import AutoModelForCausalLM
    tok = _tokenizer()
    vocab = -(-len(tok) // 8) * 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_dropout_models(tmp_path, vocab)["neox"]).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run_dir = tmp_path / "run"
    run_train(["model=hf", f"model.name_or_path={tmp_path / 'm'}", "loss=dpo", "loss.beta=0.1", "datasets=[sample]",
               "max_length=96", "max_prompt_length=48", "n_examples=4", "batch_size=4", "eval_batch_size=4",
               "n_eval_examples=4", "do_first_eval=false", "device=cpu", "export_hf=false", "lr=1e-3",
               f"run_dir={run_dir}"])
    step1 = read_metrics(run_dir)[0]
    assert step1["step"] == 1
    assert abs(step1["loss"] - math.log(2)) < 1e-6
    assert step1["rewards/chosen"] == pytest.approx(0, abs=1e-7)
    assert step1["rewards/rejected"] == pytest.approx(0, abs=1e-7)


# ----------------------------------------------------------------------------- vocabulary / positions


def test_position_limit_is_a_config_error(tmp_path):
    from transformers import GPT2Config, MambaConfig
    from caldpo.train.model import check_vocab_and_positions
    tok = _tokenizer()
    path = _save(tmp_path, "gpt2", GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_embd=16, n_head=2))
    check_vocab_and_positions(_model_cfg(max_length=64, max_prompt_length=32), tok, str(path))
    with pytest.raises(ConfigError, match=r"max_length=65 exceeds the 64 positions"):
        check_vocab_and_positions(_model_cfg(max_length=65, max_prompt_length=32), tok, str(path))
    # a model that declares no position limit is not checked
    path = _save(tmp_path, "mamba", MambaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1))
    check_vocab_and_positions(_model_cfg(max_length=100000, max_prompt_length=32), tok, str(path))


def test_tokenizer_larger_than_head_is_a_config_error(tmp_path):
    from transformers import GPT2Config
    from caldpo.train.model import check_vocab_and_positions
    tok = _tokenizer()
    v = len(tok)
    path = _save(tmp_path, "gpt2", GPT2Config(vocab_size=v, n_positions=64, n_layer=1, n_embd=16, n_head=2))
    cfg = _model_cfg(max_length=64, max_prompt_length=32)
    check_vocab_and_positions(cfg, tok, str(path))
    tok.add_special_tokens({"pad_token": "<pad>"})
    with pytest.raises(ConfigError) as e:
        check_vocab_and_positions(cfg, tok, str(path))
    msg = str(e.value)
    assert f"has {v + 1} tokens (largest id {v}, pad id {v})" in msg and f"output head has {v} rows" in msg


def test_preflight_runs_before_data(tmp_path, capsys):
    """max_length beyond the positions stops the run before any data is tokenized or trained."""
    from transformers import AutoModelForCausalLM, GPT2Config
    tok = _tokenizer()
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=-(-len(tok) // 8) * 8, n_positions=64, n_layer=1,
                                                n_embd=16, n_head=2)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc, out, err = _cli(capsys, ["model=hf", f"model.name_or_path={tmp_path / 'm'}", "loss=sft", "device=cpu",
                                 f"run_dir={tmp_path / 'run'}"])
    assert rc == 2, err[-2000:]
    assert "max_length=512 exceeds the 64 positions" in err
    assert "tokens sample/train" not in out and not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- load-time tokenization


def test_identical_after_truncation_dropped_and_counted():
    tok = char_tokenizer()
    same_start = Example("P:", " abcdefgh one", " abcdefgh two", "keep_end", "f:1")
    distinct = Example("P:", " yes", " no", "keep_end", "f:2")
    kept, report = tokenize_dataset([same_start, distinct], tok, max_length=12, max_prompt_length=2,
                                    dataset="d", split="train")
    # 2 + 14 > 12: responses cut to 10 tokens, ' abcdefgh ' for both
    assert [ex.source for ex in kept] == ["f:2"]
    assert report.dropped == {"identical_after_truncation": 1} and report.kept == 1 and report.examples == 2
    assert "dropped: identical_after_truncation=1" in str(report)
    kept, report = tokenize_dataset([same_start], tok, max_length=64, max_prompt_length=8)
    assert len(kept) == 1 and report.dropped == {}  # untruncated they differ


@pytest.mark.parametrize("bad, reason, what", [
    (" half an emoji \ud83d", "untokenizable", "the tokenizer cannot encode this text"),
    (f" fine{EOS} tail", "eos_in_text", "the chosen response contains the EOS token"),
])
def test_bad_text_names_its_row_or_is_skipped(bad, reason, what):
    tok = _tokenizer()
    examples = [Example(PROMPT, " Four.", " Five.", "keep_end", "data/train.jsonl:6"),
                Example(PROMPT, bad, " Five.", "keep_end", "data/train.jsonl:7")]
    kw = dict(max_length=96, max_prompt_length=48)
    with pytest.raises(ExampleError) as e:
        tokenize_dataset(examples, tok, **kw)
    assert isinstance(e.value, DataError)
    assert str(e.value).startswith(f"data/train.jsonl:7: {what}") and "data.on_error=skip" in str(e.value)
    kept, report = tokenize_dataset(examples, tok, on_error="skip", **kw)
    assert [ex.source for ex in kept] == ["data/train.jsonl:6"] and report.skipped == {reason: 1}


def test_examples_tokenize_once_at_load(tmp_path):
    """Through the trainer's loader: file:line of a lone surrogate (a JSON escape, valid JSON),
    skip counts, and ids cached on each example (collation never calls the tokenizer again)."""
    from caldpo.train.schedule import Examples
    rows = [hh(PROMPT, f" Four, reply {i}.", f" Five, reply {i}.") for i in range(8)]
    lines = [json.dumps(r) for r in rows]
    lines[6] = lines[6].replace("Four", "Four \\ud83d")
    write_jsonl(tmp_path / "d" / "train.jsonl", lines)
    write_jsonl(tmp_path / "d" / "test.jsonl", [json.dumps(r) for r in rows[:2]])
    tok = _tokenizer()
    over = [*TINY, f"data.paths.sample={tmp_path / 'd'}"]
    with pytest.raises(DataError, match=rf"{tmp_path / 'd' / 'train.jsonl'}:7: the tokenizer cannot encode"):
        Examples(load_config(over), "train", sft=False, verbose=False, tokenizer=tok)
    data = Examples(load_config([*over, "data.on_error=skip"]), "train", sft=False, verbose=False, tokenizer=tok)
    assert len(data) == 7 and data.token_reports[0].skipped == {"untokenizable": 1}
    assert all(ex.tokens is not None for ex in data.items)

    class NoTokenizer:
        def __call__(self, *a, **k):
            raise AssertionError("tokenized again")

    ex = tokenized(data.items[0], NoTokenizer(), max_length=96, max_prompt_length=48)
    assert ex["chosen_input_ids"] == tok(data.items[0].prompt + data.items[0].chosen,
                                         add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_dataset_smaller_than_a_batch_is_a_config_error(tmp_path, capsys):
    rows = [hh(PROMPT, f" Four {i}.", f" Five {i}.") for i in range(4)]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows)
    rc, _, err = _cli(capsys, [*TINY, "loss=dpo", f"data.paths.sample={tmp_path / 'd'}", "batch_size=8",
                               f"run_dir={tmp_path / 'run'}"])
    assert rc == 2, err[-2000:]
    assert "batch_size=8" in err and "4 training examples" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "DONE").exists()
