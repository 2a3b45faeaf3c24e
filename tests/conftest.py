"""Tiny random models and a tiny real BPE tokenizer, built from configs: tests never download anything."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from modeling_monoformer import train_bpe_tokenizer

CORPUS = [
    "a photo of a sneaker", "an ankle boot", "a photo of a bag", "a pullover", "a dress", "a coat",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "must be in want of a wife.", "the quick brown fox jumps over the lazy dog",
] * 10


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(CORPUS, vocab_size, padding_side="left")


def tiny_llama(vocab_size: int = 300, seed: int = 0, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.update(kwargs)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen2(vocab_size: int = 320, seed: int = 0, **kwargs) -> Qwen2ForCausalLM:
    """Tied embeddings and a vocabulary padded past the tokenizer, as the real Qwen2 checkpoints have."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )
    cfg.update(kwargs)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def qwen2():
    return tiny_qwen2()
