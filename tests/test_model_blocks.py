"""Which modules FSDP2 shards and activation checkpointing wraps when model.block_name is null."""
import pytest
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from caldpo.train.config import ConfigError
from caldpo.train.model import transformer_blocks


def _llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=100))


def test_inferred_blocks_are_the_decoder_layers():
    lm = _llama()
    blocks = transformer_blocks(lm, None)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 3
    assert all(a is b for a, b in zip(blocks, lm.model.layers))


def test_named_block_and_unknown_name():
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=100))
    assert len(transformer_blocks(lm, "GPTNeoXLayer")) == 2
    with pytest.raises(ConfigError, match="no module of that class"):
        transformer_blocks(lm, "LlamaDecoderLayer")
