"""The recipes' training step: token-weighted accumulation, clipping, and the optimizer step inside backward."""

from __future__ import annotations

import pytest
import torch

from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.training import StepStats, make_optimizer, training_step

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.1.self_attn.q_proj": 0.5, "model.layers.3.mlp.up_proj": 0.25}


def wrapped(**options):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, **options))
    model.train()
    return model


def uneven_batch(seed: int) -> dict:
    """A batch whose rows carry different numbers of labels, so per-micro-batch means would weight them wrongly."""
    batch = tiny_batch(seed=seed, batch=4)
    batch["labels"][0, :10] = -100
    batch["labels"][2, :6] = -100
    return batch


def split(batch: dict, parts: int) -> list[dict]:
    return [{k: v[i::parts] for k, v in batch.items()} for i in range(parts)]


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_only_loss", [True, False])
def test_micro_batches_equal_one_big_batch_with_clipping(label_only_loss):
    batches = [uneven_batch(seed) for seed in range(3)]
    whole, parts = wrapped(label_only_loss=label_only_loss), wrapped(label_only_loss=label_only_loss)
    whole_optimizer, parts_optimizer = make_optimizer(whole, lr=1e-2), make_optimizer(parts, lr=1e-2)
    for batch in batches:
        expected = training_step(whole, [batch], whole_optimizer, max_grad_norm=0.01)
        got = training_step(parts, split(batch, 2), parts_optimizer, max_grad_norm=0.01)
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4) and expected.grad_norm > 0.01
        assert (got.labelled_tokens, got.tokens) == (expected.labelled_tokens, expected.tokens)
    assert_same(trained(parts), trained(whole))
    assert any(not torch.equal(v, trained(wrapped())[n]) for n, v in trained(whole).items())


def test_optimizer_in_backward_matches_the_ordinary_step():
    batches = [uneven_batch(seed) for seed in range(3)]
    ordinary, in_backward = wrapped(), wrapped()
    ordinary_optimizer = make_optimizer(ordinary, lr=1e-2, weight_decay=0.1)
    hooked_optimizer = make_optimizer(in_backward, lr=1e-2, weight_decay=0.1, in_backward=True, accumulation_steps=2)
    for batch in batches:
        training_step(ordinary, split(batch, 2), ordinary_optimizer)
        stats = training_step(in_backward, split(batch, 2), hooked_optimizer)
        assert isinstance(stats, StepStats) and stats.grad_norm is None
        assert all(p.grad is None for p in in_backward.parameters() if p.requires_grad)
    assert_same(trained(in_backward), trained(ordinary))


def test_learning_rate_changes_apply_to_the_in_backward_updates():
    model = wrapped()
    optimizer = make_optimizer(model, lr=1e-2, in_backward=True)
    before = trained(model)
    optimizer.param_groups[0]["lr"] = 0.0  # what a scheduler does
    training_step(model, [uneven_batch(0)], optimizer)
    assert_same(trained(model), before)


def test_bad_steps_are_refused():
    model = wrapped()
    with pytest.raises(ValueError, match="accumulation_steps=2"):
        training_step(model, split(uneven_batch(0), 2), make_optimizer(model, lr=1e-3, in_backward=True))
    with pytest.raises(ValueError, match="max_grad_norm cannot be used"):
        training_step(model, [uneven_batch(0)], make_optimizer(model, lr=1e-3, in_backward=True), max_grad_norm=1.0)
    batch = uneven_batch(0)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="No labelled token"):
        training_step(model, [batch], make_optimizer(model, lr=1e-3))
    with pytest.raises(ValueError, match="at least one micro-batch"):
        training_step(model, [], make_optimizer(model, lr=1e-3))
    with pytest.raises(ValueError, match="nothing to optimize"):
        make_optimizer(tiny_llama().requires_grad_(False), lr=1e-3)
