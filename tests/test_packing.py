"""Padding-free batches (`InstructionCollator(packed=True)`): the same loss and gradients as the padded batch, for
Pock, LoRA and plain models, and in the training step."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pock_hf import PockConfig, get_pock_model
from pock_hf.data import IGNORE_INDEX, InstructionCollator, real_token_count

from .tiny import TINY_LLAMA, tiny_llama

SCHEME = {"model.layers.1.mlp.up_proj": 0.5, "model.layers.3.self_attn.v_proj": 0.5}


def examples(lengths=(9, 4, 14), seed: int = 3) -> list[dict]:
    """Tokenized examples of different lengths, their first part masked out of the labels as a prompt is."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(0, TINY_LLAMA["vocab_size"], (length,), generator=generator).tolist()
        prompt = length // 3
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def test_packed_batch_is_one_row_of_real_tokens_with_restarting_positions():
    rows = examples()
    packed = InstructionCollator(pad_token_id=0, packed=True)(rows)
    assert set(packed) == {"input_ids", "labels", "position_ids"}  # no attention_mask: transformers masks by position
    assert packed["input_ids"].shape == (1, 27) and real_token_count(packed) == 27
    assert packed["position_ids"][0].tolist() == [*range(9), *range(4), *range(14)]
    assert packed["input_ids"][0].tolist() == [t for row in rows for t in row["input_ids"]]
    starts = [0, 9, 13]
    assert all(packed["labels"][0, start] == IGNORE_INDEX for start in starts)  # nothing predicted across a boundary
    padded = InstructionCollator(pad_token_id=0)(rows)
    assert padded["input_ids"].shape == (3, 14) and real_token_count(padded) == 27


def pock_model():
    return get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, init_weights=False)).train()


def lora_model():
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj", "up_proj"], init_lora_weights=False))


def full_model():
    return tiny_llama().train()


@pytest.mark.parametrize("make_model", [pock_model, lora_model, full_model], ids=["pock", "lora", "full"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_batch(make_model, attention):
    rows = examples()
    losses, grads = [], []
    for packed in (False, True):
        model = make_model()
        model.config._attn_implementation = attention
        batch = InstructionCollator(pad_token_id=0, packed=packed)(rows)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_stays_within_each_packed_example():
    """Changing one example's tokens changes no other example's hidden states."""
    rows = examples()
    collate = InstructionCollator(pad_token_id=0, packed=True)
    model = tiny_llama()
    with torch.no_grad():
        before = model.model(**{k: v for k, v in collate(rows).items() if k != "labels"}, use_cache=False)
        rows[1]["input_ids"] = [(t + 1) % TINY_LLAMA["vocab_size"] for t in rows[1]["input_ids"]]
        after = model.model(**{k: v for k, v in collate(rows).items() if k != "labels"}, use_cache=False)
    hidden_before, hidden_after = before.last_hidden_state[0], after.last_hidden_state[0]
    torch.testing.assert_close(hidden_after[:9], hidden_before[:9])
    torch.testing.assert_close(hidden_after[13:], hidden_before[13:])
    assert not torch.allclose(hidden_after[9:13], hidden_before[9:13])
