"""caldpo's per-sequence log-probs on small random models of many architectures, against the
model's own logits.

For each architecture a tiny random model is built locally (2 layers, hidden 32, vocab 131), its
head made to matter (a non-zero bias where the head has one, logits of several units so that a
scale or a soft-cap changes them), and ``LogProbModel`` (what training uses: backbone hidden
states + the fused head) is compared with ``model(...).logits`` -> float64 log-softmax -> gather
-> sum over the response tokens, values and the gradients of every parameter, on every CPU
backend; the Triton backend runs in one subprocess under TRITON_INTERPRET=1. Heads the fused
kernels cannot reproduce must be refused at load (``output_head``); ``attn_implementation=auto``
must pick an implementation the class accepts; FLOP counts include a tied head.

Table for the notes: ``python tests/test_architectures.py`` (worst relative error per
architecture x backend, Triton included).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from caldpo.kernels import available_backends
from caldpo.kernels.backends import triton_interpreting
from caldpo.train.config import ConfigError
from caldpo.train.model import LogProbModel, check_attention, count_matmul_params
from caldpo.train.output_head import output_head

V, H, L = 131, 32, 2
B, T = 2, 11
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=0)
LLAMA_LIKE = dict(hidden_size=H, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    """name -> (config class name, kwargs, expected head (bias, scale, softcap), output weight gain)."""
    return {
        "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=H, intermediate_size=64, num_hidden_layers=L,
                                           num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25),
                     (False, 1.0, None), 40.0),
        "gpt2_tied": ("GPT2Config", dict(n_embd=H, n_layer=L, n_head=4, n_positions=64), (False, 1.0, None), 40.0),
        "llama": ("LlamaConfig", LLAMA_LIKE, (False, 1.0, None), 40.0),
        "mistral": ("MistralConfig", LLAMA_LIKE, (False, 1.0, None), 40.0),
        "qwen2_tied": ("Qwen2Config", dict(LLAMA_LIKE, tie_word_embeddings=True), (False, 1.0, None), 40.0),
        "phi_bias": ("PhiConfig", dict(hidden_size=H, intermediate_size=64, num_hidden_layers=L,
                                       num_attention_heads=4, max_position_embeddings=64), (True, 1.0, None), 40.0),
        "gptj_bias": ("GPTJConfig", dict(n_embd=H, n_layer=L, n_head=4, n_positions=64, rotary_dim=4),
                      (True, 1.0, None), 40.0),
        "gemma2_softcap": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=3.0),
                           (False, 1.0, 3.0), 60.0),
        "gemma3_softcap": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.5),
                           (False, 1.0, 2.5), 60.0),
        "cohere_scale": ("CohereConfig", dict(LLAMA_LIKE, logit_scale=0.0625), (False, 0.0625, None), 400.0),
        "granite_scale": ("GraniteConfig", dict(LLAMA_LIKE, logits_scaling=8.0), (False, 0.125, None), 300.0),
        "opt": ("OPTConfig", dict(hidden_size=H, ffn_dim=64, num_hidden_layers=L, num_attention_heads=4,
                                  max_position_embeddings=64, word_embed_proj_dim=H), (False, 1.0, None), 40.0),
        "stablelm": ("StableLmConfig", LLAMA_LIKE, (False, 1.0, None), 40.0),
    }


ARCHS = list(_configs())


def build(name: str, seed: int = 0):
    """A tiny random model of architecture `name` in fp32, eval mode, with its head made to matter."""
    import transformers
    from transformers import AutoModelForCausalLM
    cls_name, kw, _, gain = _configs()[name]
    config = getattr(transformers, cls_name)(**COMMON, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    out = model.get_output_embeddings()
    with torch.no_grad():
        out.weight.mul_(gain)  # tied or not: the final norm keeps the hidden states in range
        if getattr(out, "bias", None) is not None:
            out.bias.normal_(0.0, 2.0)
    model.config.name_or_path = f"tiny-{name}"
    return model


def batch(seed: int = 1):
    """Two padded rows (right padding on the second), prompt positions labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def model_logps(model, ids, mask, labels):
    """The oracle: the model's own logits -> float64 log-softmax -> gather at labels[t+1] -> sum."""
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    picked = lp.gather(-1, torch.where(keep, tgt, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(name: str, backend: str) -> dict:
    """Relative errors of caldpo's sequence log-probs and of every parameter gradient (as one
    vector) against the model's own logits, for architecture `name` on `backend`."""
    model = build(name)
    ids, mask, labels = batch()
    up = torch.tensor([0.7, -1.3], dtype=torch.float64)
    ref = model_logps(model, ids, mask, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad((ref * up).sum(), params)
    lpm = LogProbModel(model, backend)
    out = lpm(input_ids=ids, attention_mask=mask, labels=labels)
    grads = torch.autograd.grad((out.double() * up).sum(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    flat = torch.cat([g.flatten() for g in grads])
    ref_flat = torch.cat([g.flatten() for g in ref_grads])
    return {"logps": rel(out, ref), "grads": rel(flat, ref_flat), "head": lpm.head}


CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("name", ARCHS)
def test_head_is_read_and_checked(name):
    """output_head finds each architecture's bias / scale / soft-cap (then checked by the probe)."""
    bias, scale, softcap = _configs()[name][2]
    head = output_head(build(name))
    assert (head.bias, head.softcap) == (bias, softcap) and head.scale == pytest.approx(scale)


@pytest.mark.skipif(triton_interpreting(), reason="CPU backends run in the parent process")
@pytest.mark.parametrize("name", ARCHS)
def test_logprobs_match_model_cpu_backends(name):
    for backend in CPU_BACKENDS:
        err = compare(name, backend)
        assert err["logps"] < 1e-5 and err["grads"] < 1e-4, (backend, err)


@pytest.mark.skipif(not triton_interpreting(), reason="run by test_triton_under_interpreter")
@pytest.mark.parametrize("name", ARCHS)
def test_logprobs_match_model_triton(name):
    err = compare(name, "triton")
    assert err["logps"] < 1e-5 and err["grads"] < 1e-4, err


@pytest.mark.skipif(triton_interpreting(), reason="this is the parent")
def test_triton_under_interpreter():
    """Every architecture through the Triton kernels, one interpreter subprocess for all."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "test_logprobs_match_model_triton"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"{len(ARCHS)} passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


def test_dropped_head_transform_would_be_caught():
    """The comparison is sensitive to each head transform: a LogProbModel told the plain head
    (what caldpo computed before heads were read) is off by far more than the tolerance."""
    from caldpo.train.output_head import OutputHead
    for name in ("phi_bias", "gemma2_softcap", "cohere_scale", "granite_scale"):
        model = build(name)
        ids, mask, labels = batch()
        ref = model_logps(model, ids, mask, labels)
        out = LogProbModel(model, "torch", head=OutputHead())(input_ids=ids, attention_mask=mask, labels=labels)
        assert rel(out, ref) > 1e-2, name


def _refused(model, match):
    with pytest.raises(ConfigError, match=match):
        LogProbModel(model, "torch")


def test_unsupported_heads_are_refused():
    """Heads with something else between the last hidden state and the logits are refused at load,
    naming the model and the difference: a non-linear prediction head (ModernBERT decoder), a
    per-vocabulary learned logit scale (Dory), and a known head whose config the table does not
    cover (a soft-cap key renamed), simulated by hiding the cap from the reader."""
    import transformers
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    mb = transformers.ModernBertDecoderConfig(**COMMON, hidden_size=H, intermediate_size=64, num_hidden_layers=L,
                                              num_attention_heads=4, max_position_embeddings=64)
    _refused(AutoModelForCausalLM.from_config(mb).float(), "cannot reproduce")
    dory = AutoModelForCausalLM.from_config(transformers.DoryConfig(**COMMON, **LLAMA_LIKE)).float()
    with torch.no_grad():
        dory.get_output_embeddings().logit_scale.uniform_(0.5, 2.0)
    _refused(dory, "cannot reproduce")
    gemma = build("gemma2_softcap")
    import caldpo.train.output_head as oh
    old = oh.SOFTCAP_KEYS
    oh.SOFTCAP_KEYS = ("not_a_key",)
    try:
        _refused(gemma, r"tiny-gemma2_softcap \(Gemma2ForCausalLM\).*plain")
    finally:
        oh.SOFTCAP_KEYS = old


def test_attention_auto_picks_what_the_class_accepts(tmp_path, caplog):
    """auto: Gemma-2 (``_supports_sdpa = False``) gets eager with a log line, Llama gets SDPA;
    an explicit sdpa for Gemma-2 is a config error."""
    def cfg(path, impl="auto"):
        return OmegaConf.create({"model": {"attn_implementation": impl, "name_or_path": str(path), "preset": "hf",
                                           "trust_remote_code": False}})
    for name in ("gemma2_softcap", "llama"):
        build(name).config.save_pretrained(tmp_path / name)
    with caplog.at_level("INFO", logger="caldpo"):
        assert check_attention(cfg(tmp_path / "gemma2_softcap"), torch.device("cpu")) == "eager"
    assert "does not support SDPA" in caplog.text
    assert check_attention(cfg(tmp_path / "llama"), torch.device("cpu")) == "sdpa"
    with pytest.raises(ConfigError, match="sdpa"):
        check_attention(cfg(tmp_path / "gemma2_softcap", "sdpa"), torch.device("cpu"))


def test_matmul_params_count_the_head_tied_or_not():
    """FLOP counting: every non-embedding parameter plus the [V, H] head, also when it is tied
    (it used to be subtracted with the input embedding). Expected counts from the config."""
    import transformers
    from transformers import AutoModelForCausalLM
    h, i, layers = H, 64, L
    neox = AutoModelForCausalLM.from_config(transformers.GPTNeoXConfig(
        **COMMON, hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=64, tie_word_embeddings=False))
    per_layer = 2 * (2 * h) + (3 * h * h + 3 * h) + (h * h + h) + (i * h + i) + (h * i + h)
    assert count_matmul_params(neox) == (layers * per_layer + 2 * h + V * h, layers, h, V)
    gpt2 = AutoModelForCausalLM.from_config(transformers.GPT2Config(**COMMON, n_embd=h, n_inner=i, n_layer=layers,
                                                                    n_head=4, n_positions=64))
    assert gpt2.get_output_embeddings().weight is gpt2.get_input_embeddings().weight
    per_layer = 2 * (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
    # position table (64 x h) excluded, tied head (V x h) included once
    assert count_matmul_params(gpt2) == (layers * per_layer + 2 * h + V * h, layers, h, V)


def _table() -> None:
    """Prints the architecture x backend table of worst relative errors (logps, gradients)."""
    if not triton_interpreting():
        backends = CPU_BACKENDS
        rows = {name: {b: compare(name, b) for b in backends} for name in ARCHS}
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, __file__, "--triton-only"], env=env, capture_output=True, text=True)
        tri = dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)
        print("| architecture | head | " + " | ".join(backends + ["triton (interpreter)"]) + " |")
        print("|---|---|" + "---|" * (len(backends) + 1))
        for name, errs in rows.items():
            head = next(iter(errs.values()))["head"].describe()
            cells = [f"{max(e['logps'], e['grads']):.1e}" for e in errs.values()]
            print(f"| {name} | {head} | " + " | ".join(cells) + f" | {tri.get(name, proc.stderr[-200:])} |")
    else:
        for name in ARCHS:
            e = compare(name, "triton")
            print(f"{name}\t{max(e['logps'], e['grads']):.1e}", flush=True)


if __name__ == "__main__":
    _table()
