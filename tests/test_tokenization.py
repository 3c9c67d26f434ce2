"""Response tokens are those of prompt + response tokenized as one text, for every tokenizer family.

Tokenizers are built here with the `tokenizers` library: byte-level BPE (GPT-NeoX/Pythia,
GPT-2), SentencePiece-like BPE and Unigram with a Metaspace dummy prefix (Llama-2 /
Mistral layout), and WordPiece (BERT-like). The invariants are checked against the
tokenizer itself: each sequence is exactly ``tokenizer(prompt + response)`` plus EOS, the
prompt part is a prefix shared by chosen and rejected, and labels mask exactly it.
"""
from __future__ import annotations

import json

import pytest

from _data_fixtures import REALDATA, without_offsets
from caldpo.train.batches import encode_example, flatten, tokenize_example
from caldpo.train.data import load_dataset

EOS = "</s>"
CORPUS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then bake it.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "SUBREDDIT: r/cooking\nTITLE: Bread question\nPOST: My bread is flat every time.\nTL;DR: flat bread",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "abcdef abc def summary summarize Hello hello there, Assistant: Human: TL;DR:",
] * 3
PAIRS = [  # (prompt, chosen, rejected): HH-like, TL;DR-like, and responses without a leading space
    ("\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour and water.", " I don't know."),
    ("SUBREDDIT: r/cooking\nTITLE: Bread question\nPOST: My bread is flat.\nTL;DR:", " flat bread", " bread"),
    ("TL;DR:", "summary", "summarize"),
    ("Hello", " there", "there"),
]


def _fast(tok, **special):
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, **special)
    fast.pad_token = EOS
    return fast


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)  # as Pythia's tokenizer.json
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _fast(tok)


def sentencepiece_bpe():
    """Llama-2's tokenizer.json layout: a normalizer that prepends the dummy prefix '▁' to every
    text and turns spaces into '▁', BPE. (Pieces split at '▁' as SentencePiece's whitespace split does.)"""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    chars = sorted(set("".join(CORPUS).replace(" ", "▁")) | {"▁"})
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", EOS],
                                                        initial_alphabet=chars, show_progress=False))
    return _fast(tok, unk_token="<unk>")


def sentencepiece_unigram():
    """Unigram with a Metaspace pre-tokenizer adding the dummy prefix (T5 / newer SentencePiece exports)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>", EOS],
                                                            unk_token="<unk>", show_progress=False))
    return _fast(tok, unk_token="<unk>")


def wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[UNK]", EOS],
                                                              show_progress=False))
    return _fast(tok, unk_token="[UNK]")


FAMILIES = {"byte_level_bpe": byte_level_bpe, "sentencepiece_bpe": sentencepiece_bpe,
            "sentencepiece_unigram": sentencepiece_unigram, "wordpiece": wordpiece}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


def joint_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sequences_are_the_joint_tokenization(family):
    name, tok = family
    eos = tok.eos_token_id
    for prompt, chosen, rejected in PAIRS:
        ex = tokenize_example(prompt, chosen, rejected, tok, max_length=1024, max_prompt_length=512,
                              truncation_mode="keep_end")
        n = len(ex["prompt_input_ids"])
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            seq = ex[f"{side}_input_ids"]
            assert seq == joint_ids(tok, prompt + text) + [eos], (name, prompt, text)
            assert seq[:n] == ex["prompt_input_ids"]
            assert ex[f"{side}_labels"] == [-100] * n + seq[n:]
            assert len(seq) > n  # at least EOS is scored
        # the prompt part never holds a token with response characters: it decodes inside the prompt
        offsets = tok(prompt + chosen, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert all(end <= len(prompt) for _, end in offsets[:n])


def test_no_lone_dummy_prefix_token():
    """Llama-2 layout: tokenizing the response ' Mix flour...' alone prepends another '▁'
    ('▁▁Mix' or '▁' '▁Mix'), not the text of the joint sequence. Response tokens are the joint ones."""
    tok = sentencepiece_bpe()
    prompt, chosen, rejected = PAIRS[0]
    ex = tokenize_example(prompt, chosen, rejected, tok, max_length=1024, max_prompt_length=512,
                          truncation_mode="keep_end")
    n = len(ex["prompt_input_ids"])
    response = ex["chosen_input_ids"][n:-1]
    separate = joint_ids(tok, chosen)
    assert "".join(tok.convert_ids_to_tokens(separate)).startswith("▁▁")  # the dummy prefix, doubled
    assert separate != response
    assert "".join(tok.convert_ids_to_tokens(response)) == chosen.replace(" ", "▁")
    assert ex["prompt_input_ids"] == joint_ids(tok, prompt)


def test_straddling_token_belongs_to_the_response():
    """WordPiece tokenizes 'Hello summ' + 'ary' as 'Hello' 'summar' '##y': 'summar' straddles the
    boundary. It is scored as response; the prompt part keeps only whole prompt tokens."""
    tok = wordpiece()
    prompt, response = "Hello summ", "ary"
    full = tok(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    straddle = [i for i, (s, e) in enumerate(full["offset_mapping"]) if s < len(prompt) < e]
    assert len(straddle) == 1
    ex = tokenize_example(prompt, response, None, tok, max_length=64, max_prompt_length=32, truncation_mode="keep_end")
    n = len(ex["prompt_input_ids"])
    assert ex["chosen_input_ids"] == full["input_ids"] + [tok.eos_token_id]
    assert n == straddle[0] == 1 and ex["chosen_labels"][1] == full["input_ids"][1]
    assert all(e <= len(prompt) for _, e in full["offset_mapping"][:n])
    assert all(e > len(prompt) for _, e in full["offset_mapping"][n:])


def test_prompt_prefix_shared_when_responses_merge_differently():
    """The prompt part of a pair is one prefix of both sequences even when a token straddles the
    boundary in one sequence only (here chosen continues the word, rejected starts a new one)."""
    tok = wordpiece()
    alone = joint_ids(tok, "Hello summ")
    assert len(alone) > 1  # 'Hello' + the pieces of 'summ': rejected keeps them all in its prompt part
    ex = tokenize_example("Hello summ", "ary", " ary", tok, max_length=64, max_prompt_length=32,
                          truncation_mode="keep_end")
    n = len(ex["prompt_input_ids"])
    assert n == 1 and ex["chosen_input_ids"][:n] == ex["rejected_input_ids"][:n] == ex["prompt_input_ids"]
    assert ex["chosen_input_ids"] == joint_ids(tok, "Hello summary") + [tok.eos_token_id]
    assert ex["rejected_input_ids"] == joint_ids(tok, "Hello summ ary") + [tok.eos_token_id]
    assert ex["rejected_input_ids"][1:len(alone)] == alone[1:]  # scored: part of rejected's response here


def test_slow_path_without_offsets_agrees():
    """A tokenizer without offsets (slow) splits at the common prefix with the prompt alone."""
    tok = sentencepiece_bpe()
    no_offsets = without_offsets(tok)

    for prompt, chosen, rejected in PAIRS[:2]:
        kw = dict(max_length=1024, max_prompt_length=512, truncation_mode="keep_end")
        assert encode_example(prompt, chosen, rejected, no_offsets, **kw).prompt.tolist() == \
            encode_example(prompt, chosen, rejected, tok, **kw).prompt.tolist()


HH = REALDATA / "hh_rlhf_sample.jsonl"
TLDR = REALDATA / "tldr_comparisons_sample.jsonl"


def test_byte_level_joint_equals_separate_on_real_rows():
    """For Pythia's byte-level BPE and HH / TL;DR responses (they start with a space) the joint
    split is the reference code's separate tokenization, row for row: same prompt ids, same
    response ids (the full reference-format comparison is tests/test_realdata.py)."""
    from caldpo.train.tiny import build_tokenizer
    tok = build_tokenizer()
    n = 0
    for name, path in (("hh", HH), ("tldr", TLDR)):
        groups, _ = load_dataset(name, "test", path=str(path))
        for ex in flatten(groups, sft=False):
            enc = encode_example(ex.prompt, ex.chosen, ex.rejected, tok, max_length=10**6, max_prompt_length=10**6 - 1,
                                 truncation_mode=ex.truncation_mode)
            assert enc.prompt.tolist() == joint_ids(tok, ex.prompt), ex.source
            assert enc.chosen.tolist() == joint_ids(tok, ex.chosen) + [tok.eos_token_id], ex.source
            assert enc.rejected.tolist() == joint_ids(tok, ex.rejected) + [tok.eos_token_id], ex.source
            n += 1
    assert n == 81 + 19
    assert json.loads(HH.read_text().splitlines()[0])  # the rows are the real file's


BOUNDARY_TEXTS = [
    "\n\nHuman: héllo wörld  日本語\u0301 ok?\n\nAssistant:   Sure —   tabs\tand\n\n\nnewlines 😀😀 end",
    "TL;DR:summary summarize   Hello hello there, Assistant: Human: TL;DR: ﬁ Å Å",
]


def _rule(offsets, n_chars: int) -> int:
    """The boundary rule written out: leading tokens with start < n_chars and end <= n_chars."""
    count = 0
    for start, end in offsets:
        if not (start < n_chars and end <= n_chars):
            break
        count += 1
    return count


def test_the_batched_boundary_is_the_offset_rule_at_every_cut(family):
    """``TextEncoder`` (the backend's bisection where it applies) places the prompt boundary where the
    rule over the ordinary call's offsets does, for a prompt ending at every character of texts with
    combining marks, ligatures, emoji, runs of spaces, tabs and newlines."""
    from caldpo.train.batches import TextEncoder
    name, tok = family
    texts, prompts = [], []
    for text in BOUNDARY_TEXTS:
        for cut in range(len(text) + 1):
            texts.append(text)
            prompts.append(text[:cut])
    enc = TextEncoder(tok)(texts, prompts)
    for i, (text, prompt) in enumerate(zip(texts, prompts)):
        ordinary = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        assert enc.text(i).tolist() == ordinary["input_ids"], (name, i)
        assert enc.prompt_tokens[i] == _rule(ordinary["offset_mapping"], len(prompt)), (name, repr(prompt))


def test_offsets_out_of_order_use_every_tokens_offsets(monkeypatch):
    """A tokenizer whose offsets ever go backwards leaves the bisection: the rule is applied to every
    token's offsets, with the same boundaries."""
    from caldpo.train import batches
    tok = byte_level_bpe()
    text = BOUNDARY_TEXTS[0]
    texts, prompts = [text] * (len(text) + 1), [text[:cut] for cut in range(len(text) + 1)]
    searched = batches.TextEncoder(tok)(texts, prompts)
    monkeypatch.setattr(batches, "_ordered", lambda offsets: False)
    encoder = batches.TextEncoder(tok)
    full = encoder(texts, prompts)
    assert not encoder.search and encoder.backend is not None
    assert full.prompt_tokens.tolist() == searched.prompt_tokens.tolist()
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert full.prompt_tokens.tolist() == [_rule(offsets, len(p)) for p in prompts]


CUT_TEXT = ("\n\nHuman: it's 1234 dogs'\n\nAssistant: sure\n\nHuman: ok 😀\r\n\r\nAssistant:  fine é\u0301\n \n\t"
            "Next: a\xa0\nb\u2028\nc\x1c\nd'\n's\n99\n.\n\n\n end 日本\n語 x \n\nTL;DR: done")


def _byte_level_variant(normalizer=None, added=(), prefix_space=False):
    """byte_level_bpe with an NFC normalizer (as Pythia's tokenizer.json), added tokens, or a dummy prefix space."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers
    fast = byte_level_bpe()
    backend = fast.backend_tokenizer
    if normalizer == "nfc":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    for content, strip in added:
        backend.add_tokens([AddedToken(content, rstrip=strip, normalized=False)])
    return fast


def test_prompt_prefixes_encoded_once_equal_the_whole_texts():
    """Where a tokenizer ``splits_at_cuts`` (byte-level BPE with GPT-2's regex: Pythia), each prompt's
    part before its ``cut_point`` is encoded once for all its responses (``TextEncoder.raw`` with prompts):
    the ids are the ordinary call's on the whole text and the boundary the rule over its offsets, for a
    prompt ending at every character of a text with contractions, digits, emoji, combining marks, CRLF,
    no-break and line-separator spaces, control characters and runs of whitespace before newlines."""
    from caldpo.train.batches import TextEncoder, cut_point, splits_at_cuts
    texts, prompts = [], []
    for cut in range(len(CUT_TEXT) + 1):
        for response in (" more\n\nHuman: x", "y\n", ""):
            texts.append(CUT_TEXT[:cut] + response)
            prompts.append(CUT_TEXT[:cut])
    assert sum(cut_point(p) > 0 for p in prompts) > len(prompts) // 2
    cases = {"byte_level": byte_level_bpe(), "byte_level_nfc": _byte_level_variant("nfc"),
             "spaces_added": _byte_level_variant("nfc", added=[("   ", False)])}
    for name, tok in cases.items():
        assert splits_at_cuts(tok.backend_tokenizer), name
        encoder = TextEncoder(tok)
        enc = encoder(texts, prompts, encoder.raw(texts, prompts))
        assert encoder.cut, name  # the first text agreed: the parts served every text
        for i, (text, prompt) in enumerate(zip(texts, prompts)):
            ordinary = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            assert enc.text(i).tolist() == ordinary["input_ids"], (name, repr(prompt))
            assert enc.prompt_tokens[i] == _rule(ordinary["offset_mapping"], len(prompt)), (name, repr(prompt))


def test_tokenizers_that_may_join_across_a_cut_encode_whole_texts(family):
    """Every other layout encodes whole texts: a dummy prefix (the suffix would get one), an added
    token holding a newline or stripping whitespace (it could cover the cut), SentencePiece and
    WordPiece families."""
    from caldpo.train.batches import splits_at_cuts
    name, tok = family
    assert splits_at_cuts(tok.backend_tokenizer) is (name == "byte_level_bpe")
    assert not splits_at_cuts(_byte_level_variant(prefix_space=True).backend_tokenizer)
    assert not splits_at_cuts(_byte_level_variant(added=[("a\nb", False)]).backend_tokenizer)
    assert not splits_at_cuts(_byte_level_variant(added=[("zz", True)]).backend_tokenizer)


def test_parts_that_disagree_with_the_whole_text_fall_back(monkeypatch):
    """If the parts ever differ from the ordinary call on the first text, whole texts are encoded from
    then on (never a wrong id): a cut placed inside a word here."""
    from caldpo.train import batches
    tok = byte_level_bpe()
    monkeypatch.setattr(batches, "cut_point", lambda prompt: len(prompt) // 2)
    texts = ["\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water."] * 2
    prompts = ["\n\nHuman: How do I bake bread?\n\nAssistant:"] * 2
    encoder = batches.TextEncoder(tok)
    enc = encoder(texts, prompts, encoder.raw(texts, prompts))
    assert not encoder.cut
    assert enc.text(1).tolist() == tok(texts[1], add_special_tokens=False)["input_ids"]
