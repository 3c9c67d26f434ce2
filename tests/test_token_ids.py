"""A token id the model's input embedding has no row for is one config error naming the id, the
embedding's size and the sequence (its dataset file:line when known), on the forward path (padded and
packed layouts) and before generation; never an index error or a CUDA device-side assert."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from caldpo.train.batches import tokenize_example
from caldpo.train.config import ConfigError
from caldpo.train.generate import generate_responses
from caldpo.train.layout import pack
from caldpo.train.model import TokenIdError, load_causal_lm, model_path

PROMPT, CHOSEN, REJECTED = "\n\nHuman: What is 2 plus 2?\n\nAssistant:", " 4, of course.", " 5"


@pytest.fixture(scope="module")
def tiny(tiny_logprob_model):
    return tiny_logprob_model


def _example(tok):
    return tokenize_example(PROMPT, CHOSEN, REJECTED, tok, max_length=64, max_prompt_length=32,
                            truncation_mode="keep_end")


def test_padded_forward_names_the_id_the_size_and_the_row(tiny):
    _, model, tok = tiny
    rows = model.lm.get_input_embeddings().num_embeddings
    ex = _example(tok)
    ids = torch.tensor([ex["chosen_input_ids"], ex["chosen_input_ids"]])
    labels = torch.tensor([ex["chosen_labels"]] * 2)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)  # in range: runs
    ids[1, 3] = rows + 7
    with pytest.raises(TokenIdError) as e:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert isinstance(e.value, ConfigError) and (e.value.token, e.value.rows) == (rows + 7, rows)
    assert f"token id {rows + 7} in padded row 1 of the micro-batch" in str(e.value)
    assert f"position 3 is outside the model's input embedding ({rows} rows" in str(e.value)


def test_packed_forward_names_the_id(tiny):
    _, model, tok = tiny
    rows = model.lm.get_input_embeddings().num_embeddings
    packed = pack([_example(tok)], "packed", sft=False, pad_token_id=tok.pad_token_id)
    packed.input_ids[0, 1] = -3
    with pytest.raises(TokenIdError, match=r"token id -3 in packed row 0 of the micro-batch, position 1 .*"
                                           rf"\({rows} rows"):
        model(packed=packed)


def test_generation_names_the_prompt_and_its_source_before_generating(tiny):
    cfg, model, tok = tiny
    lm = load_causal_lm(cfg, model_path(cfg), torch.float32, "sdpa")
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    lm.resize_token_embeddings(max(ids))  # the prompt's largest id has no row now
    called = []
    lm.generate = lambda *a, **kw: called.append(1)
    first = next(p for p in (" 4", " 5", "4") if max(tok(p, add_special_tokens=False)["input_ids"]) < max(ids))
    with pytest.raises(TokenIdError) as e:
        generate_responses(SimpleNamespace(lm=lm), tok, [first, PROMPT], cfg, torch.device("cpu"), 2,
                           sources=["a.jsonl:1", "data/test.jsonl:7"])
    assert e.value.token == max(ids) and e.value.rows == max(ids) and not called
    assert f"token id {max(ids)} in prompt 1 (data/test.jsonl:7), position {ids.index(max(ids))}" in str(e.value)


def test_the_loaded_embedding_is_checked_against_the_tokenizer_once(tiny):
    """The trainer's path: after loading, the input embedding must have a row for every id the tokenizer
    can produce (its largest id, pad, EOS), so no example's ids need scanning and no forward meets one."""
    from caldpo.train.model import check_embedding_covers_tokenizer

    _, _, tok = tiny
    largest = max(len(tok) - 1, max(tok.get_vocab().values()))
    top = max(largest, tok.eos_token_id, tok.pad_token_id)

    def lm(rows):
        return SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(rows, 2))

    check_embedding_covers_tokenizer(lm(top + 1), tok)  # every id has its row: nothing raised
    with pytest.raises(TokenIdError) as e:
        check_embedding_covers_tokenizer(lm(top), tok)
    assert (e.value.token, e.value.rows) == (top, top)
    assert f"token id {top} in the tokenizer's" in str(e.value) and f"({len(tok)} tokens)" in str(e.value)
