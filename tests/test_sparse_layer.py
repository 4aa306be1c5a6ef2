"""Channel-sparse update: one step equals a dense step restricted to the selected channels; autograd saves and
computes only the sparse part."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from pock_hf import PockConfig, get_pock_model
from pock_hf.tuner import Linear as PockLinear

from .tiny import tiny_batch, tiny_llama

SCHEME = {
    "model.layers.1.self_attn.q_proj": 0.25,
    "model.layers.2.mlp.down_proj": 0.5,
    "model.layers.3.mlp.up_proj": 1.0,
}


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("ratio_scale", [0.25, 0.5, 1.0])
def test_one_sgd_step_equals_dense_step_restricted_to_selected_channels(axis, ratio_scale):
    scheme = {name: min(1.0, ratio * ratio_scale * 2) for name, ratio in SCHEME.items()}
    batch, lr = tiny_batch(), 0.5
    dense = tiny_llama()
    dense.train()
    dense_loss = dense(**batch).loss
    dense_loss.backward()
    dense_grads = {n: m.weight.grad for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    before = linear_weights(dense)

    model = get_pock_model(tiny_llama(), PockConfig(scheme=scheme, channel_axis=axis))
    model.train()
    loss = model(**batch).loss
    torch.testing.assert_close(loss, dense_loss)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    updated = model.updated_modules
    after = linear_weights(model.merge_and_unload())

    assert set(updated) == set(scheme)
    for name, weight in after.items():
        changed = (weight != before[name]).nonzero()
        if name not in scheme:
            assert changed.numel() == 0, f"{name} is not in the scheme but changed"
            continue
        channels = torch.tensor(updated[name].channels)
        dim = 0 if axis == "out" else 1
        expected = before[name].clone()
        expected.index_copy_(dim, channels, (before[name] - lr * dense_grads[name]).index_select(dim, channels))
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)
        # only selected channels may move
        assert set(changed[:, dim].tolist()) <= set(channels.tolist())


@pytest.mark.parametrize("axis", ["out", "in"])
def test_forward_equals_merged_weight_forward(axis):
    batch = tiny_batch()
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, channel_axis=axis, init_weights=False))
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"]).logits
        merged = model.merge_and_unload()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)
    # the random init really changes the output (so the check above is not vacuous)
    plain = tiny_llama()(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)


def sparse_linear(axis: str, ratio: float = 0.25) -> PockLinear:
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=True).requires_grad_(False)
    channels = 48 if axis == "out" else 64
    indices = torch.arange(0, channels, int(1 / ratio))
    return PockLinear(base, "default", ratio, axis, indices, init_weights=False)


def saved_shapes(layer: nn.Module, x: torch.Tensor) -> tuple[list[torch.Size], torch.Tensor]:
    """Shapes of the activations autograd keeps for backward (views of the layer's own weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    shapes = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            shapes.append(tensor.shape)
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    return shapes, y


def test_in_axis_saves_only_the_selected_input_slice():
    layer = sparse_linear("in")
    x = torch.randn(3, 5, 64, requires_grad=True)
    shapes, _ = saved_shapes(layer, x)
    k = layer.pock_indices["default"].numel()
    assert k == 16
    # of the input, only the (tokens, k) slice is kept (plus the k indices)
    assert sorted(shapes) == sorted([torch.Size([15, k]), torch.Size([k])]), shapes


def test_no_input_gradient_work_when_nothing_below_trains():
    layer = sparse_linear("out")
    x = torch.randn(3, 5, 64)  # does not require grad
    weight = layer.get_base_layer().weight
    kept = []
    with saved_tensors_hooks(lambda t: kept.append(t.untyped_storage().data_ptr()) or t, lambda t: t):
        y = layer(x)
    # the frozen weight is kept only to compute an input gradient, which nothing needs here
    assert weight.untyped_storage().data_ptr() not in kept
    y.sum().backward()
    assert x.grad is None
    assert layer.pock_delta["default"].grad.shape == (12, 64)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_weight_gradient_equals_dense_gradient_on_selected_channels(axis):
    layer = sparse_linear(axis)
    dense = nn.Linear(64, 48)
    with torch.no_grad():
        dense.weight.copy_(layer.get_base_layer().weight + layer.get_delta_weight("default"))
        dense.bias.copy_(layer.get_base_layer().bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    target = torch.randn(3, 5, 48)
    ((layer(x) - target) ** 2).sum().backward()
    ((dense(x_dense) - target) ** 2).sum().backward()
    dim = 0 if axis == "out" else 1
    indices = layer.pock_indices["default"]
    torch.testing.assert_close(layer.pock_delta["default"].grad, dense.weight.grad.index_select(dim, indices))
    torch.testing.assert_close(x.grad, x_dense.grad)
    assert layer.get_base_layer().weight.grad is None


def test_optimizer_state_exists_only_for_selected_channels():
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model(**tiny_batch()).loss.backward()
    optimizer.step()
    state_numel = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.ndim > 0)
    delta_numel = sum(p.numel() for p in trainable)
    assert state_numel == 2 * delta_numel  # exp_avg and exp_avg_sq, nothing else
    expected = 8 * 32 + 16 * 48 + 48 * 32  # q_proj: 0.25*32 rows x 32; down_proj: 0.5*32 rows x 48; up_proj: all
    assert delta_numel == expected


def test_trainable_parameter_count_is_reported(capsys):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 8 * 32 + 16 * 48 + 48 * 32
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


@pytest.mark.parametrize("rule", ["first", "magnitude"])
def test_channel_selection_rules(rule):
    base = tiny_llama()
    weight = base.model.layers[2].mlp.down_proj.weight.detach().clone()
    model = get_pock_model(base, PockConfig(scheme={"model.layers.2.mlp.down_proj": 0.25}, channel_selection=rule))
    channels = list(model.updated_modules["model.layers.2.mlp.down_proj"].channels)
    if rule == "first":
        assert channels == list(range(8))
    else:
        expected = weight.norm(dim=1).topk(8).indices.sort().values.tolist()
        assert channels == expected


def test_explicit_channel_indices_are_used_and_stored():
    indices = [3, 7, 11, 30, 31, 0, 5, 9]
    model = get_pock_model(
        tiny_llama(),
        PockConfig(
            scheme={"model.layers.2.mlp.down_proj": 0.25}, channel_indices={"model.layers.2.mlp.down_proj": indices}
        ),
    )
    assert list(model.updated_modules["model.layers.2.mlp.down_proj"].channels) == sorted(indices)


def test_copy_of_config_is_reusable_on_an_equal_model():
    config = PockConfig(scheme=SCHEME)
    first = get_pock_model(tiny_llama(seed=0), copy.deepcopy(config))
    second = get_pock_model(tiny_llama(seed=5), config)  # same architecture, other weights: accepted
    assert set(first.updated_modules) == set(second.updated_modules) == set(SCHEME)
