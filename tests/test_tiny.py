"""The tiny Pythia-shaped model: loadable with Auto classes, deterministic, sane shapes."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from caldpo.train import tiny
from caldpo.train.sample import sample_path

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, vocab_size=300, max_position_embeddings=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny.build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(built):
    return AutoTokenizer.from_pretrained(built)


def _sample_texts(n=40):
    texts = []
    for split in ("train", "test"):
        with open(sample_path(split), encoding="utf-8") as f:
            for line in list(f)[:n]:
                row = json.loads(line)
                texts += [row["chosen"], row["rejected"]]
    return texts


def test_auto_classes_load_pythia_shape(built):
    model = AutoModelForCausalLM.from_pretrained(built)
    cfg = model.config
    assert cfg.model_type == "gpt_neox" and type(model).__name__ == "GPTNeoXForCausalLM"
    assert cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert cfg.hidden_act == "gelu" and cfg.intermediate_size == 4 * cfg.hidden_size
    rope = getattr(cfg, "rope_parameters", None) or {}
    assert rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", None)) == 0.25
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (built / "model.safetensors").is_file()


def test_special_tokens(tok, built):
    assert tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 0
    cfg = AutoModelForCausalLM.from_pretrained(built).config
    assert cfg.eos_token_id == cfg.bos_token_id == 0
    assert tok("hello")["input_ids"][-1] != tok.eos_token_id  # no special tokens added


def test_vocab_padded_to_multiple_of_8(tmp_path, tok, built):
    assert AutoModelForCausalLM.from_pretrained(built).config.vocab_size % 8 == 0
    out = tiny.build_tiny(tmp_path, **SMALL)
    n_tok = len(AutoTokenizer.from_pretrained(out))
    v = AutoModelForCausalLM.from_pretrained(out).config.vocab_size
    assert v % 8 == 0 and n_tok < v < n_tok + 8  # 300 BPE tokens leave padding rows


def test_round_trip_and_no_eos_from_text(tok):
    texts = _sample_texts() + [tiny.GENERIC_CORPUS, "Unicode: caf\u00e9 \u2603 \u65e5\u672c \U0001f600", "  "]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.eos_token_id not in ids
        assert max(ids) < len(tok)
    hh = tok("\n\nHuman: What is 2 plus 2?\n\nAssistant: 2 plus 2 is 4.")["input_ids"]
    assert len(hh) < 30  # BPE merges learned from the sample keep it short


def test_deterministic(tmp_path):
    a, b = tiny.build_tiny(tmp_path / "a", **SMALL), tiny.build_tiny(tmp_path / "b", **SMALL)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny.build_tiny(tmp_path / "c", **{**SMALL, "seed": 1})
    sc = load_file(c / "model.safetensors")
    assert not torch.equal(sa["embed_out.weight"], sc["embed_out.weight"])


def test_forward_shapes(built, tok):
    model = AutoModelForCausalLM.from_pretrained(built)
    batch = tok(["\n\nHuman: Hi\n\nAssistant: Hello!", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    b, t = batch["input_ids"].shape
    assert out.logits.shape == (b, t, model.config.vocab_size)
    assert out.hidden_states[-1].shape == (b, t, 64)
    assert torch.isfinite(out.logits).all()
    # the hidden-state + head path the fused kernels use reproduces the logits
    assert torch.allclose(model.get_output_embeddings()(out.hidden_states[-1]), out.logits, atol=1e-5)


def test_tiny_model_dir_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("CALDPO_CACHE", str(tmp_path / "env"))
    d = tiny.tiny_model_dir(**SMALL)
    assert d.parent == tmp_path / "env" and (d / "tokenizer.json").is_file()
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert tiny.tiny_model_dir(**SMALL) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".build-")]
    other = tiny.tiny_model_dir(tmp_path / "explicit", **{**SMALL, "seed": 3})
    assert other.parent == tmp_path / "explicit" and other.name != d.name
    with pytest.raises(TypeError):
        tiny.tiny_model_dir(tmp_path, hidden=3)


def test_tiny_model_dir_loses_race_cleanly(tmp_path, monkeypatch):
    """If another process publishes the entry while we build, we keep theirs and drop ours."""
    real_build = tiny.build_tiny

    def racing_build(out, **kw):
        real_build(out, **kw)
        final = tmp_path / f"tiny-pythia-{tiny._build_key({**tiny.DEFAULTS, **SMALL})}"
        shutil.copytree(out, final)
        (final / "winner").touch()

    monkeypatch.setattr(tiny, "build_tiny", racing_build)
    d = tiny.tiny_model_dir(tmp_path, **SMALL)
    assert (d / "winner").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [d.name]
    AutoModelForCausalLM.from_pretrained(d)
