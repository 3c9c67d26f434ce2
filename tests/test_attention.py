"""Segment attention (caldpo/train/attention.py) and mask-free padded rows, against the padded layout.

The oracle is the padded layout's forward with its attention mask, on a copy of the model loaded
with plain SDPA (none of attention.py in its path), in float64 with the materialising head:
independent of the segment metadata, the emulation and the fused head. Per-sequence log-probs and
the gradients of a weighted sum of them, in fp32, must be within 1e-5 relative (max abs error over
max abs value) for pairs and SFT, empty responses, responses that share their first tokens,
one-row and multi-row packings, a GPT-NeoX (partial rotary, head dims 12 and 80) and a Llama (GQA).
Inputs and outputs are checked finite (NaN never passes: a NaN makes the error NaN, which fails).
"""
from __future__ import annotations

import copy

import pytest
import torch

from test_layout import EOS, _example, _pairs, _rel, _sft

from caldpo.train import attention as att
from caldpo.train.batches import collate
from caldpo.train.layout import pack
from caldpo.train.losses import concatenated, padded_inputs
from caldpo.train.model import LogProbModel

RTOL = 1e-5


def _edge_pairs() -> list[dict]:
    """_pairs (chosen just EOS; truncated with rejected = the prompt; a one-token prompt; responses
    beginning alike) and chosen = the prompt alone while rejected goes on (chosen inside the shared part)."""
    g = torch.Generator().manual_seed(3)
    return [*_pairs(), _example(g, 10, 0, 6, truncated=True)]


def _configs():
    from transformers import GPTNeoXConfig, LlamaConfig
    return {
        "gpt_neox": GPTNeoXConfig(vocab_size=512, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, rotary_pct=0.5, max_position_embeddings=128,
                                  use_parallel_residual=False, tie_word_embeddings=False),
        "gpt_neox_d80": GPTNeoXConfig(vocab_size=512, hidden_size=160, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, rotary_pct=0.25, max_position_embeddings=128,
                                      tie_word_embeddings=False),
        "llama": LlamaConfig(vocab_size=512, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                             tie_word_embeddings=True),
    }


def _build(config, impl: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl, dtype=dtype)
    return lm.eval()


@pytest.fixture(scope="module")
def models() -> dict:
    """name -> (model with attention.NAME, float64 copy with plain SDPA: the oracle's)."""
    out = {}
    for name, config in _configs().items():
        lm = _build(config, att.register())
        oracle = _build(config, "sdpa", torch.float64)
        oracle.load_state_dict({k: v.double() for k, v in lm.state_dict().items()})
        out[name] = (lm, oracle)
    return out


def _grads(lm) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}


def _padded_oracle(oracle, examples, sft: bool, weights):
    """The padded layout's forward with its mask, float64, materialised head: (log-probs, grads)."""
    model = LogProbModel(oracle, "reference")
    batch = collate(examples, EOS)
    sides = ("chosen",) if sft else ("chosen", "rejected")
    inputs = padded_inputs(batch, torch.device("cpu"), sides)
    mask = torch.cat([torch.nn.functional.pad(batch[f"{s}_attention_mask"],
                                              (0, inputs["input_ids"].shape[1] - batch[f"{s}_attention_mask"].shape[1]))
                      for s in sides])
    oracle.zero_grad(set_to_none=True)
    logps = model(input_ids=inputs["input_ids"], attention_mask=mask, labels=inputs["labels"])
    (logps * weights).sum().backward()
    return logps.detach(), _grads(oracle)


def _check(name, got, grads, expected, g_expected, errors):
    assert torch.isfinite(got).all(), name
    err = _rel(got, expected)
    g_err = max(_rel(grads[k], g) for k, g in g_expected.items())
    assert grads.keys() == g_expected.keys(), name
    errors[name] = (err, g_err)
    assert err <= RTOL and g_err <= RTOL, (name, err, g_err)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt_neox_d80", "llama"])
@pytest.mark.parametrize("sft", [False, True], ids=["pairs", "sft"])
def test_segments_match_padded_layout(models, arch, sft):
    lm, oracle = models[arch]
    model = LogProbModel(lm, "torch")
    examples = _sft() if sft else _edge_pairs()
    n_seq = len(examples) * (1 if sft else 2)
    weights = torch.linspace(0.5, 1.5, n_seq, dtype=torch.float64)
    expected, g_expected = _padded_oracle(oracle, examples, sft, weights)
    errors = {}
    layouts = ("packed",) if sft else ("packed", "prefix_shared")
    for layout in layouts:
        for rows in (0, 24, 64):  # one row; rows of 24 or 64 tokens (multi-row, padding segments)
            pb = pack(examples, layout, sft=sft, pad_token_id=EOS, row_tokens=rows, segments=True)
            lm.zero_grad(set_to_none=True)
            got = model(packed=pb)
            (got.double() * weights).sum().backward()
            _check(f"{layout}/segments/{rows}", got, _grads(lm), expected, g_expected, errors)
    # the padded layout itself without its mask (right padding: causal attention, no mask)
    lm.zero_grad(set_to_none=True)
    inputs = padded_inputs(collate(examples, EOS), torch.device("cpu"), ("chosen",) if sft else ("chosen", "rejected"))
    assert inputs["attention_mask"] is None
    got = model(**inputs)
    (got.double() * weights).sum().backward()
    _check("padded/no mask", got, _grads(lm), expected, g_expected, errors)
    print(arch, "sft" if sft else "pairs", {k: f"{a:.1e}/{b:.1e}" for k, (a, b) in errors.items()})


def test_segment_metadata_of_a_pair():
    """One pair, shared prefix s: queries [s + c] -> keys [s + c]; queries [r] -> keys [s] + [r]."""
    ex = _pairs()[0]  # prompt 21, chosen 6 + EOS, rejected 11 + EOS
    pb = pack([ex], "prefix_shared", sft=False, pad_token_id=EOS, segments=True)
    s, c, r = 21, 7, 12
    seg = pb.segments()
    assert seg.cu_q.dtype == seg.cu_k.dtype == torch.int32
    assert seg.cu_q.tolist() == [0, s + c, s + c + r]
    assert seg.cu_k.tolist() == [0, s + c, 2 * s + c + r]
    assert seg.kv_index.tolist() == list(range(s + c)) + list(range(s)) + list(range(s + c, s + c + r))
    assert (seg.max_q, seg.max_k) == (s + c, s + r if s + r > s + c else s + c)
    # packed (no sharing): keys are the queries, no gather
    plain = pack([ex], "packed", sft=False, pad_token_id=EOS, segments=True).segments()
    assert plain.kv_index is None and torch.equal(plain.cu_q, plain.cu_k)


def test_metadata_refuses_gaps():
    with pytest.raises(ValueError, match="tile"):
        att.Segments.from_spans([(0, 3), (4, 2)], [[(0, 3)], [(4, 2)]], 6)
    with pytest.raises(ValueError, match="cover"):
        att.Segments.from_spans([(0, 3)], [[(0, 3)]], 5)


def test_emulation_is_bottom_right_causal():
    """A query segment of 2 against 5 keys: query 0 sees keys 0-3, query 1 all five (float64, by hand)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 4, generator=g, dtype=torch.float64) for n in (2, 5, 5))
    seg = att.Segments.from_spans([(0, 2)], [[(0, 5)]], 2)
    seg = att.Segments(seg.cu_q, seg.cu_k, None, 2, 5, (2,), (5,))
    out = att.emulate(q, k, v, seg, None)
    for t, visible in ((0, 4), (1, 5)):
        w = torch.softmax(torch.einsum("hd,khd->hk", q[t], k[:visible]) / 2.0, dim=-1)
        assert torch.allclose(out[t], torch.einsum("hk,khd->hd", w, v[:visible]))


def test_layouts_refuse_a_model_without_segments(models):
    lm, oracle = models["gpt_neox"]
    pb = pack(_pairs(), "prefix_shared", sft=False, pad_token_id=EOS, segments=True)
    with pytest.raises(ValueError, match="attn_implementation"):
        LogProbModel(copy.deepcopy(oracle).float(), "torch")(packed=pb)


def test_padded_rows_run_sdpa_without_a_mask(models, monkeypatch):
    """Right-padded rows reach SDPA with no mask and is_causal (flash-eligible) and HF builds no mask;
    left-padded rows keep theirs."""
    import transformers.masking_utils as mu
    lm, _ = models["gpt_neox"]
    model = LogProbModel(lm, "torch")
    calls, built = [], []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append((kw.get("attn_mask") is None, kw.get("is_causal")))
        return real_sdpa(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    real_mask = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **kw: built.append(1) or real_mask(*a, **kw))
    with torch.no_grad():
        model(**concatenated(collate(_pairs(), EOS), torch.device("cpu")))
    assert calls and all(c == (True, True) for c in calls) and not built
    calls.clear()
    left = torch.tensor([[EOS, EOS, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 6, 7], [-100, -100, 3, 4, 5]])
    with torch.no_grad():
        model(input_ids=left, attention_mask=mask, labels=labels)
    assert calls and all(not no_mask for no_mask, _ in calls) and built


def test_padded_inputs_detect_right_padding():
    batch = collate(_pairs(), EOS)
    assert padded_inputs(batch, torch.device("cpu"))["attention_mask"] is None
    batch["chosen_attention_mask"][0, 0] = 0  # a hole at the start: not right padding
    assert padded_inputs(batch, torch.device("cpu"))["attention_mask"] is not None


def test_kept_index_is_the_scored_positions():
    batch = collate(_pairs(), EOS)
    inputs = padded_inputs(batch, torch.device("cpu"))
    lab = inputs["labels"]
    shifted = torch.full_like(lab, -100)
    shifted[:, :-1] = lab[:, 1:]
    assert torch.equal(inputs["kept"], (shifted.reshape(-1) != -100).nonzero().squeeze(1))


@pytest.mark.parametrize("requested,layout,device,dtypes,expected", [
    ("auto", "prefix_shared", "cpu", (torch.float32,), "varlen" if att.CPU_SEGMENTS else "sdpa"),
    ("varlen", "prefix_shared", "cpu", (torch.float32,), "varlen"),
    ("sdpa", "prefix_shared", "cpu", (torch.float32,), "sdpa"),
    ("auto", "padded", "cpu", (torch.float32,), "sdpa"),
    ("varlen", "padded", "cpu", (torch.float32,), "sdpa"),
])
def test_packed_attention_choice(requested, layout, device, dtypes, expected):
    attn = "varlen" if requested == "varlen" else "sdpa"
    assert att.packed_attention(requested, attn, layout, torch.device(device), dtypes) == expected


def test_cuda_fallback_without_16_bit(monkeypatch):
    """On CUDA an fp32 model falls back to dense masks (the varlen kernel takes bf16/fp16 only)."""
    monkeypatch.setattr(att, "varlen_unavailable", lambda device: None)
    cuda = torch.device("cuda")
    assert att.packed_attention("auto", "sdpa", "prefix_shared", cuda, (torch.bfloat16, torch.float16)) == "varlen"
    assert att.packed_attention("auto", "sdpa", "prefix_shared", cuda, (torch.float32, torch.float16)) == "sdpa"
    monkeypatch.setattr(att, "varlen_unavailable", lambda device: "old torch")
    assert att.packed_attention("varlen", "varlen", "prefix_shared", cuda, (torch.bfloat16,)) == "sdpa"


def test_models_with_a_sliding_window_keep_sdpa():
    from transformers import MistralConfig
    cfg = MistralConfig(sliding_window=16)
    assert att.unsupported(cfg) and att.hf_implementation("sdpa", cfg) == "sdpa"
    with pytest.raises(ValueError, match="sliding"):
        att.hf_implementation("varlen", cfg)
    assert att.hf_implementation("sdpa", _configs()["llama"]) == att.NAME


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernel needs a CUDA device")
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_kernel_matches_emulation(head_dim, dtype):
    """The kernel against the emulation on the same segments (prefix-shared pairs), outputs and gradients."""
    why = att.varlen_unavailable(torch.device("cuda"))
    if why:
        pytest.skip(why)
    examples = _edge_pairs()
    pb = pack(examples, "prefix_shared", sft=False, pad_token_id=EOS, segments=True)
    seg = pb.segments().to(torch.device("cuda"))
    n, heads = pb.input_ids.numel(), 4
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(1, heads, n, head_dim, generator=g, device="cuda", dtype=dtype) for _ in range(3)]
    grad = torch.randn(1, n, heads, head_dim, generator=g, device="cuda", dtype=dtype)
    results = {}
    for kernel in ("varlen", "emulate"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = att.segment_attention(q, k, v, seg, head_dim ** -0.5, kernel=kernel)
        out.backward(grad)
        results[kernel] = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["varlen"], results["emulate"]):
        assert torch.isfinite(a).all(), name
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 2e-2, (name, head_dim, dtype, err)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_bf16_segments_as_close_as_padded(models, arch):
    """bf16 (the dtype the varlen kernel runs in; here its emulation): every sequence's log-prob as
    segments is as close to the float64 padded oracle as the bf16 padded layout's (within twice its
    largest error)."""
    lm32, oracle = models[arch]
    examples = _edge_pairs()
    weights = torch.ones(2 * len(examples), dtype=torch.float64)
    expected, _ = _padded_oracle(oracle, examples, False, weights)
    model = LogProbModel(copy.deepcopy(lm32).to(torch.bfloat16), "torch")
    with torch.no_grad():
        padded = model(**concatenated(collate(examples, EOS), torch.device("cpu"))).double()
        padded_err = float((padded - expected).abs().max())
        bound = 2 * padded_err + 1e-4
        for layout in ("packed", "prefix_shared"):
            got = model(packed=pack(examples, layout, sft=False, pad_token_id=EOS, segments=True)).double()
            assert torch.isfinite(got).all()
            err = float((got - expected).abs().max())
            print(arch, layout, f"bf16 max abs err {err:.2e} (padded bf16 {padded_err:.2e}), rel {_rel(got, expected):.1e}")
            assert err <= bound, (layout, err, bound)


def test_layout_resolution_with_segments():
    from caldpo.train.layout import CUDA_AUTO_LAYOUT, resolve_layout
    assert resolve_layout("auto", "varlen") == "prefix_shared"
    assert resolve_layout("auto", "varlen", "cuda") == CUDA_AUTO_LAYOUT == "padded"  # pending the GPU table
    assert resolve_layout("prefix_shared", "varlen", "cuda") == "prefix_shared"


def _fake_varlen(calls):
    """A stand-in for torch's varlen_attn with the 2.13 signature: records its keyword arguments and
    answers with the emulation (causal only when asked for)."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append({"window_size": window_size, "scale": scale, "enable_gqa": enable_gqa,
                      "kv_heads": key.shape[1]})
        assert window_size == (-1, 0)
        q_lens = tuple((cu_seq_q[1:] - cu_seq_q[:-1]).tolist())
        k_lens = tuple((cu_seq_k[1:] - cu_seq_k[:-1]).tolist())
        return att.emulate(query, key, value, att.Segments(cu_seq_q, cu_seq_k, None, max_q, max_k, q_lens, k_lens),
                           scale)
    return varlen_attn


def _fake_varlen_2_10(calls):
    """The older signature: ``is_causal``, no scale, no GQA."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append({"is_causal": is_causal, "kv_heads": key.shape[1]})
        assert is_causal
        q_lens = tuple((cu_seq_q[1:] - cu_seq_q[:-1]).tolist())
        k_lens = tuple((cu_seq_k[1:] - cu_seq_k[:-1]).tolist())
        return att.emulate(query, key, value, att.Segments(cu_seq_q, cu_seq_k, None, max_q, max_k, q_lens, k_lens),
                           None)
    return varlen_attn


@pytest.mark.parametrize("fake", [_fake_varlen, _fake_varlen_2_10], ids=["window_size", "is_causal"])
def test_varlen_call_adapts_to_the_signature(monkeypatch, fake):
    """The kernel call (CPU, through a stand-in with each torch's signature): causal asked the right way,
    GQA through enable_gqa or repeated key heads, a non-default scale passed or folded into q; the
    result equals the emulation's."""
    import torch.nn.attention.varlen as tv
    calls = []
    monkeypatch.setattr(tv, "varlen_attn", fake(calls))
    att.varlen_signature.cache_clear()
    try:
        pb = pack(_edge_pairs(), "prefix_shared", sft=False, pad_token_id=EOS, segments=True)
        seg = pb.segments()
        g = torch.Generator().manual_seed(0)
        n = seg.total_q
        q = torch.randn(1, 4, n, 16, generator=g, dtype=torch.float64)
        k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64) for _ in range(2))
        for scale in (16 ** -0.5, 0.1):
            got = att.segment_attention(q, k, v, seg, scale, kernel="varlen")
            want = att.segment_attention(q, k, v, seg, scale, kernel="emulate")
            torch.testing.assert_close(got, want)
        if fake is _fake_varlen:
            assert [c["scale"] for c in calls] == [16 ** -0.5, 0.1] and all(c["enable_gqa"] for c in calls)
            assert all(c["kv_heads"] == 2 for c in calls)
        else:
            assert all(c["is_causal"] and c["kv_heads"] == 4 for c in calls)  # heads repeated for the kernel
    finally:
        att.varlen_signature.cache_clear()


def test_a_window_set_but_unused_is_no_window():
    from transformers import Qwen2Config
    assert att.unsupported(Qwen2Config(use_sliding_window=False, sliding_window=4096)) is None
    assert "sliding" in att.unsupported(Qwen2Config(use_sliding_window=True, sliding_window=16,
                                                    max_window_layers=0))
