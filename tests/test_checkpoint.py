"""Checkpoints: atomic folders, the last N kept, the newest complete one found, state restored exactly."""

from __future__ import annotations

import random

import pytest
import torch

from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.training import make_optimizer, training_step
from pock_hf.io.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_trainable,
    save_checkpoint,
    set_rng_state,
)

from .tiny import tiny_batch, tiny_llama


def trained(seed: int = 0):
    model = get_pock_model(tiny_llama(seed), PockConfig(scheme={"model.layers.3.mlp.up_proj": 0.5}))
    optimizer = make_optimizer(model, lr=1e-2)
    model.train()
    training_step(model, [tiny_batch()], optimizer)
    return model, optimizer


def test_round_trip_restores_parameters_optimizer_and_rng(tmp_path):
    model, optimizer = trained()
    torch.manual_seed(5)
    random.seed(5)
    path = save_checkpoint(
        tmp_path, 3, model=model, optimizer_state=optimizer.state_dict(), state={"losses": [1.0, 0.5]}
    )
    expected_torch, expected_python = torch.rand(3), random.random()
    fresh, fresh_optimizer = trained(seed=1)
    tensors, optimizer_state, state = load_checkpoint(path)
    restore_trainable(fresh, tensors)
    fresh_optimizer.load_state_dict(optimizer_state)
    set_rng_state(state["rng"])
    assert state["step"] == 3 and state["losses"] == [1.0, 0.5]
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_python
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for key, values in saved["state"].items():
        for field, value in values.items():
            assert torch.equal(value, loaded["state"][key][field]), field


def test_keeps_the_last_n_and_ignores_temporary_and_incomplete_folders(tmp_path):
    model, optimizer = trained()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer_state=optimizer.state_dict(), state={}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / ".tmp-checkpoint-8").mkdir()  # a run killed while writing step 8
    (tmp_path / "checkpoint-10").mkdir()  # renamed by hand, no completion marker
    assert latest_checkpoint(tmp_path).name == "checkpoint-6"
    assert latest_checkpoint(tmp_path / "nothing-here") is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-10")


def test_restoring_into_another_scheme_is_refused(tmp_path):
    model, optimizer = trained()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer_state=optimizer.state_dict(), state={})
    other = get_pock_model(tiny_llama(), PockConfig(scheme={"model.layers.2.mlp.up_proj": 0.5}))
    with pytest.raises(ValueError, match="does not match the model's trainable parameters"):
        restore_trainable(other, load_checkpoint(path)[0])
