"""`copy.deepcopy` of a Pock model (how TRL makes reference and EMA models) gives an independent model: its own
layers, its own depth cut and its own forward hooks, with the same outputs and gradients as the original."""

from __future__ import annotations

import copy
import inspect

import torch

from pock_hf import PockConfig, get_pock_model

from .test_depth_cut import LayerProbe
from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.2.self_attn.v_proj": 0.5, "model.layers.3.mlp.gate_proj": 0.25}


def wrapped():
    return get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, init_weights=False))


def logits(model) -> torch.Tensor:
    batch = tiny_batch()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def deltas(model) -> list[torch.nn.Parameter]:
    return [parameter for name, parameter in model.named_parameters() if "pock_delta" in name]


def test_scaling_the_copys_deltas_changes_the_copy_only():
    model = wrapped()
    before = logits(model)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone), before)

    with torch.no_grad():
        for delta in deltas(clone):
            delta.mul_(3)
    assert not torch.allclose(logits(clone), before)
    assert torch.equal(logits(model), before)


def test_editing_the_original_leaves_the_copy_unchanged():
    model = wrapped()
    clone = copy.deepcopy(model)
    before = logits(clone)
    with torch.no_grad():
        for delta in deltas(model):
            delta.zero_()
        model.get_base_model().model.layers[0].mlp.up_proj.weight.mul_(2)
    assert not torch.allclose(logits(model), before)
    assert torch.equal(logits(clone), before)


def test_the_copy_has_its_own_depth_cut():
    model = wrapped()
    clone = copy.deepcopy(model)
    clone.train()
    probe = LayerProbe(clone.get_base_model().model.layers)
    clone(**tiny_batch()).loss.backward()
    assert probe.grad_outputs[:2] == [0, 0] and probe.backwards[:2] == [0, 0]
    assert probe.backwards[2:] == [1, 1]
    assert all(delta.grad is not None for delta in deltas(clone))
    assert all(delta.grad is None for delta in deltas(model))

    # training a layer-1 norm in the copy moves the copy's cut (read by its layers' forwards), not the original's
    clone.get_base_model().model.layers[1].input_layernorm.weight.requires_grad_(True)
    clone(**tiny_batch()).loss.backward()
    assert probe.grad_outputs[:2] == [0, 1] and probe.backwards[:2] == [0, 1]
    assert (clone.cut_layer, model.cut_layer) == (1, 2)


def test_the_copy_gets_the_originals_gradients():
    model = wrapped()
    clone = copy.deepcopy(model)
    for each in (model, clone):
        each.train()
        each(**tiny_batch()).loss.backward()
    for original, copied in zip(deltas(model), deltas(clone), strict=True):
        assert copied is not original
        torch.testing.assert_close(copied.grad, original.grad, rtol=0, atol=0)


def test_unloading_the_copy_leaves_the_original_wrapped():
    model = wrapped()
    clone = copy.deepcopy(model)
    plain = clone.merge_and_unload()
    assert not plain._forward_pre_hooks and all("forward" not in layer.__dict__ for layer in plain.model.layers)

    model.train()
    probe = LayerProbe(model.get_base_model().model.layers)
    model(**tiny_batch()).loss.backward()
    assert probe.grad_outputs[:2] == [0, 0] and probe.backwards[2:] == [1, 1]


def test_patched_forwards_keep_the_modules_signature():
    """Trainer keeps the dataset columns the model's forward names, and generate() checks its keyword arguments
    against it: the label-only loss and the depth cut must not hide the signature behind (*args, **kwargs)."""
    transformer = wrapped().get_base_model()
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(transformer.forward).parameters)
    layer = transformer.model.layers[0]
    assert "hidden_states" in inspect.signature(layer.forward).parameters
