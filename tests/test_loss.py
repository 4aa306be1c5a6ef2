"""Label-only chunked loss: the stock loss and gradients, without ever holding full logits."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from pock_hf import PockConfig, get_pock_model
from pock_hf.tuner.loss import label_only_loss

from .tiny import TINY_LLAMA, tiny_batch, tiny_llama

VOCAB = TINY_LLAMA["vocab_size"]
SCHEME = {"model.layers.2.mlp.up_proj": 0.5, "model.layers.3.self_attn.v_proj": 0.5}


def padded_batch() -> dict:
    """Two rows of different lengths: right padding (mask 0, labels -100) and a masked prompt."""
    batch = tiny_batch(length=14)
    batch["attention_mask"][1, 10:] = 0
    batch["labels"][1, 10:] = -100
    batch["labels"][0, 5:7] = -100  # a gap inside the answer, as multi-turn chat rows have
    return batch


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_equals_stock_loss_and_gradients(chunk_size):
    batch = padded_batch()
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(True)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden_stock = hidden.detach().requires_grad_(True)
    hidden_ours = hidden.detach().requires_grad_(True)

    stock = model.loss_function(model.lm_head(hidden_stock), batch["labels"], vocab_size=VOCAB)
    stock.backward()
    head_grad = model.lm_head.weight.grad.clone()
    model.lm_head.weight.grad = None
    ours = label_only_loss(hidden_ours, batch["labels"], model.lm_head, chunk_size=chunk_size)
    ours.backward()

    torch.testing.assert_close(ours, stock)
    torch.testing.assert_close(hidden_ours.grad, hidden_stock.grad)
    torch.testing.assert_close(model.lm_head.weight.grad, head_grad)


def test_num_items_in_batch_divides_the_summed_loss():
    batch = padded_batch()
    model = tiny_llama()
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
    stock = model.loss_function(model.lm_head(hidden), batch["labels"], vocab_size=VOCAB, num_items_in_batch=50)
    torch.testing.assert_close(label_only_loss(hidden, batch["labels"], model.lm_head, num_items_in_batch=50), stock)


def test_a_head_with_bias_gets_the_stock_gradients_too():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, VOCAB, bias=True)
    hidden = torch.randn(2, 6, 8)
    labels = torch.randint(0, VOCAB, (2, 6))
    labels[0, :2] = -100
    expected = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    expected_grads = torch.autograd.grad(expected, [head.weight, head.bias])
    got = label_only_loss(hidden, labels, head, chunk_size=4)
    torch.testing.assert_close(got, expected)
    for grad, want in zip(torch.autograd.grad(got, [head.weight, head.bias]), expected_grads):
        torch.testing.assert_close(grad, want)


# the plain head takes the fused path (gradients in forward); a Pock-updated head the checkpointed one
SCHEMES = [SCHEME, {**SCHEME, "lm_head": 0.25}, {"lm_head": 0.25}]
SCHEME_IDS = ["plain head", "updated head", "only the head"]


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_wrapped_model_uses_it_by_default_with_the_same_loss_and_delta_gradients(scheme):
    batch = padded_batch()
    ours = get_pock_model(tiny_llama(), PockConfig(scheme=scheme, init_weights=False))
    stock = get_pock_model(tiny_llama(), PockConfig(scheme=scheme, init_weights=False, label_only_loss=False))
    for model in (ours, stock):
        model.train()
    out_ours, out_stock = ours(**batch), stock(**batch)
    assert out_ours.logits is None and out_stock.logits.shape == (2, 14, VOCAB)
    torch.testing.assert_close(out_ours.loss, out_stock.loss)
    out_ours.loss.backward()
    out_stock.loss.backward()
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, grads[name])


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_full_logits_never_exist(scheme):
    """Not even when only the head trains, so the hidden states need no gradient."""
    batch = padded_batch()
    model = get_pock_model(tiny_llama(), PockConfig(scheme=scheme, loss_chunk_size=4))
    model.train()
    shapes = []
    with saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    assert not [s for s in shapes if s and s[-1] == VOCAB], "logits were kept for backward"


def test_calls_without_labels_and_generation_are_untouched():
    batch = padded_batch()
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    plain = tiny_llama()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=batch["input_ids"]).logits, plain(input_ids=batch["input_ids"]).logits
        )
    generated = model.generate(input_ids=batch["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)
    assert "forward" not in model.merge_and_unload().__dict__


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        PockConfig(scheme=SCHEME, loss_chunk_size=0)
