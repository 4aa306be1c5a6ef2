"""Depth cut: nothing below `cut_layer` records autograd state or runs backward, whoever turns on checkpointing."""

from __future__ import annotations

import functools

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from pock_hf import PockConfig, get_pock_model

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.2.self_attn.v_proj": 0.5, "model.layers.3.mlp.gate_proj": 0.25}


class LayerProbe:
    """Counts, per decoder layer, outputs that require grad and backward-hook calls; after `count_checkpoints()`,
    also how often each layer ran through its activation-checkpointing function."""

    def __init__(self, layers):
        self.layers = layers
        self.grad_outputs = [0] * len(layers)
        self.backwards = [0] * len(layers)
        self.checkpointed = [0] * len(layers)
        for index, layer in enumerate(layers):
            layer.register_forward_hook(self._on_forward(index))
            layer.register_full_backward_hook(self._on_backward(index))

    def count_checkpoints(self):
        for index, layer in enumerate(self.layers):
            layer._gradient_checkpointing_func = self._counting(index, layer._gradient_checkpointing_func)

    def _counting(self, index, checkpoint):
        def counted(*args, **kwargs):
            self.checkpointed[index] += 1
            return checkpoint(*args, **kwargs)

        # keep the checkpoint kwargs visible, as transformers' own functools.partial does
        return functools.partial(counted, **checkpoint.keywords)

    def _on_forward(self, index):
        def hook(module, args, output):
            self.grad_outputs[index] += int(output.requires_grad)

        return hook

    def _on_backward(self, index):
        def hook(module, grad_input, grad_output):
            self.backwards[index] += 1

        return hook


def wrapped(scheme=SCHEME, **config):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=scheme, **config))
    model.train()
    return model, LayerProbe(model.get_base_model().model.layers)


def delta_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cut_layer_is_deepest_updated_layer():
    model, _ = wrapped()
    assert model.cut_layer == 2
    model, _ = wrapped({"model.layers.0.mlp.up_proj": 0.5, "model.layers.3.mlp.up_proj": 0.5})
    assert model.cut_layer == 0
    model, _ = wrapped({"lm_head": 0.5})
    assert model.cut_layer == 4  # no decoder layer trains: the whole stack is below the cut


def test_no_backward_below_cut_plain():
    model, probe = wrapped()
    model(**tiny_batch()).loss.backward()
    assert probe.backwards[:2] == [0, 0]
    assert probe.grad_outputs[:2] == [0, 0]  # nothing below the cut recorded a graph
    assert probe.backwards[2:] == [1, 1]


@pytest.mark.parametrize("reentrant", [False, True])
def test_no_backward_below_cut_with_gradient_checkpointing(reentrant):
    reference, _ = wrapped()
    reference(**tiny_batch()).loss.backward()

    model, probe = wrapped()
    # transformers also calls enable_input_require_grads() here, forcing grads from the embeddings up
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    probe.count_checkpoints()
    model(**tiny_batch()).loss.backward()

    assert probe.backwards[:2] == [0, 0]
    assert probe.grad_outputs[:2] == [0, 0]
    # checkpointing wraps only layers at or above the cut; reentrant mode leaves the cut layer itself out
    assert probe.checkpointed == ([0, 0, 0, 1] if reentrant else [0, 0, 1, 1])
    # and the parameters get exactly the gradients of the plain run
    for name, grad in delta_grads(reference).items():
        torch.testing.assert_close(delta_grads(model)[name], grad)


def test_config_option_turns_on_checkpointing_above_the_cut_only():
    model, probe = wrapped(gradient_checkpointing=True)
    probe.count_checkpoints()
    model(**tiny_batch()).loss.backward()
    assert probe.checkpointed == [0, 0, 1, 1]
    assert probe.backwards[:2] == [0, 0]


def test_no_backward_below_cut_inside_trainer_with_gradient_checkpointing(tmp_path):
    model, probe = wrapped()
    rows = [{k: v[i].tolist() for k, v in tiny_batch(seed=s).items()} for s in range(4) for i in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        gradient_checkpointing=True,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        learning_rate=1e-2,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
    assert sum(probe.backwards[2:]) == 6
    assert probe.backwards[:2] == [0, 0]
    assert probe.grad_outputs[:2] == [0, 0]
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(before[n], after[n]) for n in before), "Trainer did not update the deltas"


def test_training_that_reaches_no_adapter_parameter_fails_loudly(monkeypatch):
    """Safety net: with the reentrant protection switched off, a reentrant checkpoint of the cut layer hands its
    parameters no gradient. A loss that still requires grad through another route must not train silently."""
    from pock_hf.tuner import depth_cut

    monkeypatch.setattr(depth_cut, "_checkpoints_reentrant", lambda layer: False)
    model, _ = wrapped({"model.layers.3.mlp.gate_proj": 0.25})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    other_route = torch.zeros((), requires_grad=True)
    model.get_base_model().model.norm.register_forward_hook(lambda m, a, out: out + 0 * other_route)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="reached none of the trainable"):
        model(**tiny_batch()).loss.backward()


def test_unload_restores_plain_layers():
    model, _ = wrapped(gradient_checkpointing=False)
    plain = model.merge_and_unload()
    assert all("forward" not in layer.__dict__ for layer in plain.model.layers)
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    plain.train()
    for p in plain.parameters():
        p.requires_grad_(True)
    plain(**tiny_batch()).loss.backward()
    assert plain.model.layers[0].mlp.up_proj.weight.grad is not None


def test_torch_autograd_grad_passes_the_backward_guard():
    """`torch.autograd.grad(loss, params)` fills no `.grad`; the guard sees its gradients all the same."""
    model, _ = wrapped({"model.layers.3.mlp.gate_proj": 0.25}, gradient_checkpointing=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(**tiny_batch()).loss, params)
    assert all(g is not None for g in grads) and all(p.grad is None for p in params)
    model(**tiny_batch()).loss.backward()  # and ordinary training still works after it
    assert all(torch.allclose(p.grad, g) for p, g in zip(params, grads))


def test_a_forward_never_backpropagated_does_not_switch_the_guard_off(monkeypatch):
    from pock_hf.tuner import depth_cut

    monkeypatch.setattr(depth_cut, "_checkpoints_reentrant", lambda layer: False)
    model, _ = wrapped({"model.layers.3.mlp.gate_proj": 0.25})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    other_route = torch.zeros((), requires_grad=True)
    model.get_base_model().model.norm.register_forward_hook(lambda m, a, out: out + 0 * other_route)
    with pytest.warns(UserWarning):
        model(**tiny_batch())  # a training-mode forward nobody backpropagates
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="reached none of the trainable"):
        model(**tiny_batch()).loss.backward()
