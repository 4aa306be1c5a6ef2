"""Optimizer step inside backward: the same parameters as the ordinary loop, gradients freed as they are used."""

from __future__ import annotations

import pytest
import torch

from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.optim_in_backward import OptimizerInBackward

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.1.self_attn.q_proj": 0.5, "model.layers.3.mlp.up_proj": 0.25}
ADAMW = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99)}


def wrapped():
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, train_norms=True))
    model.train()
    return model


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulation_steps", [1, 3])
def test_same_parameters_as_the_ordinary_loop(accumulation_steps):
    batches = [tiny_batch(seed=s) for s in range(6)]

    reference = wrapped()
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], **ADAMW)
    for index, batch in enumerate(batches, start=1):
        (reference(**batch).loss / accumulation_steps).backward()
        if index % accumulation_steps == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    model = wrapped()
    in_backward = OptimizerInBackward(model.parameters(), accumulation_steps=accumulation_steps, **ADAMW)
    for index, batch in enumerate(batches, start=1):
        (model(**batch).loss / accumulation_steps).backward()
        holding = [p.grad is not None for p in in_backward.parameters]
        # gradients live only while accumulating, and are freed by the step that uses them
        assert all(holding) == (index % accumulation_steps != 0) and (any(holding) == all(holding))

    expected, got = trainable(reference), trainable(model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[n], trainable(wrapped())[n]) for n in got), "nothing trained"


def test_global_clipping_is_refused_with_an_explanation():
    with pytest.raises(ValueError, match="max_grad_norm: clipping by the global gradient norm"):
        OptimizerInBackward(wrapped().parameters(), max_grad_norm=1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="accumulation_steps"):
        OptimizerInBackward(wrapped().parameters(), accumulation_steps=0)
    with pytest.raises(ValueError, match="nothing to optimize"):
        OptimizerInBackward([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])


def test_state_round_trip_and_detach():
    model = wrapped()
    in_backward = OptimizerInBackward(model.parameters(), **ADAMW)
    model(**tiny_batch()).loss.backward()
    states = in_backward.state_dict()
    other = OptimizerInBackward(wrapped().parameters(), **ADAMW)
    other.load_state_dict(states)
    assert other.state_dict()["optimizers"][0]["state"][0]["step"] == 1
    in_backward.detach()
    model(**tiny_batch()).loss.backward()
    assert all(p.grad is not None for p in in_backward.parameters)
