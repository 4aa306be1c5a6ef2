"""Tiny random Llama models for fast tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 4-layer random Llama (hidden 32) in fp32; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.eval()


def tiny_batch(seed: int = 1, batch: int = 2, length: int = 12, vocab: int = TINY_LLAMA["vocab_size"]) -> dict:
    """Random token ids with the first third of each row masked out of the labels, as instruction data is."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def save_tiny_checkpoint(folder, **overrides):
    """A tiny random Llama with the byte-level chat tokenizer (pad = eos), saved as an ordinary HF checkpoint folder
    that `load_model_and_tokenizer(folder)` and the command-line tools read; returns the folder."""
    from .conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tiny_llama(**{"vocab_size": len(tokenizer), "max_position_embeddings": 512, **overrides}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
