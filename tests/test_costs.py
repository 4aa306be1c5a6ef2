"""Cost profile: measured on the model at hand, exact memory accounting, exact JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pock_hf.planning import costs as costs_module
from pock_hf.planning.costs import CostProfile, profile_costs

from .tiny import tiny_llama


@pytest.fixture(scope="module")
def profile():
    return profile_costs(tiny_llama(), batch_size=2, seq_len=16, depths=[0, 3], repeats=1, progress=False)


def test_profile_covers_every_cut_depth_and_module(profile):
    assert profile.num_layers == 4
    assert len(profile.step_s_by_cut) == len(profile.activation_mb_by_cut) == 4
    assert set(profile.unit_extra_s) == set(profile.module_shapes)
    assert profile.module_shapes["mlp.down_proj"] == [32, 48]
    assert all(t > 0 for t in profile.step_s_by_cut) and profile.full_step_s > 0
    # a deeper cut keeps fewer activations (counted, not smoothed: the step times are made monotone by the profiler)
    assert profile.activation_mb_by_cut == sorted(profile.activation_mb_by_cut, reverse=True)
    assert profile.activation_mb_by_cut[0] > profile.activation_mb_by_cut[3] > 0


def test_overhead_makes_the_base_memory_the_process_peak(profile):
    # the process (interpreter, torch, this test run) holds far more than the tiny model's weights
    assert profile.overhead_mb > 10 * profile.weights_mb
    excess = {int(cut): mb for cut, mb in profile.settings["step_excess_mb"].items()}
    assert set(excess) == {0, 3}
    # each timed cut has its own overhead, the largest is `overhead_mb`, and a deeper cut never has less
    assert profile.overhead_mb == pytest.approx(max(excess.values()), abs=0.1)
    assert profile.overhead_mb_by_cut[3] == pytest.approx(max(excess[3], 0.0), abs=0.1)
    assert profile.overhead_mb_by_cut == sorted(profile.overhead_mb_by_cut, reverse=True)
    for cut in range(4):
        expected = profile.overhead_mb_by_cut[cut] + profile.weights_mb + profile.activation_mb_by_cut[cut]
        assert profile.base_memory_mb(cut) == pytest.approx(expected)
    # a profile from before the per-cut overhead uses its one overhead for every cut
    old = dataclasses.replace(profile, overhead_mb_by_cut=[])
    assert old.base_memory_mb(3) == pytest.approx(old.overhead_mb + old.weights_mb + old.activation_mb_by_cut[3])


def test_unit_memory_is_parameter_gradient_and_adam_state(profile):
    # up_proj is 48 x 32: a quarter of its 48 rows is 12 rows x 32 inputs, five fp32 copies each (parameter,
    # gradient, two moments, and the optimizer step's denominator)
    assert profile.unit_memory_mb("mlp.up_proj", 0.25) == 12 * 32 * 4 * 5 / 2**20
    assert profile.unit_memory_mb("mlp.up_proj", 0.25, axis="in") == 8 * 48 * 4 * 5 / 2**20
    whole = profile.unit_memory_mb("*", 1.0)
    assert whole == sum(o * i for o, i in profile.module_shapes.values()) * 20 / 2**20
    assert profile.unit_time_s("mlp.up_proj", 0.5) == pytest.approx(profile.unit_extra_s["mlp.up_proj"] * 0.5)


def test_trained_values_on_a_bf16_base_are_counted_as_the_float32_deltas_they_are():
    model = tiny_llama().to(torch.bfloat16)
    profile = profile_costs(model, batch_size=1, seq_len=8, depths=[3], repeats=1, measure_full=False, progress=False)
    assert profile.weights_mb == sum(p.numel() * 2 for p in model.parameters()) / 2**20  # the frozen bf16 weights
    assert profile.bytes_per_value == 4
    assert profile.unit_memory_mb("mlp.up_proj", 0.25) == 12 * 32 * 4 * 5 / 2**20
    # every profiled step's peak is recorded beside the overhead, which is the largest of them
    assert max(profile.settings["step_excess_mb"].values()) == pytest.approx(profile.overhead_mb, abs=0.1)
    assert set(profile.settings["module_step_excess_mb"]) == set(profile.module_shapes)


def test_profile_round_trips_exactly_and_knows_its_model(profile, tmp_path):
    profile.to_json(tmp_path / "costs.json")
    assert CostProfile.from_json(tmp_path / "costs.json") == profile
    profile.check_model(tiny_llama())
    with pytest.raises(ValueError, match=profile.model_fingerprint["digest"]):
        profile.check_model(tiny_llama(seed=3))


def test_profiling_leaves_the_model_as_it_was():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    profile_costs(model, batch_size=1, seq_len=8, depths=[1], repeats=1, progress=False)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - 1
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "Linear"


def test_a_budget_skips_the_cuts_that_would_not_fit_and_extrapolates_their_activations(monkeypatch):
    """With a budget that holds the top two cuts' steps but not the third's, the lower cuts are neither timed nor
    held, and their activation memory, extrapolated, equals the counted one (the layers are identical). The process
    is simulated as 1,000 MB of overhead around the model, so the test does not hang on this machine's RSS."""
    model = tiny_llama()
    shape = {"batch_size": 2, "seq_len": 16, "depths": [0, 1, 2, 3], "repeats": 1, "progress": False}
    free = profile_costs(model, **shape)
    weights, activation = free.weights_mb, free.activation_mb_by_cut
    process = {"peak": 0.0}
    real_step = costs_module._wrapped_step_s

    def step(model, scheme, batch, repeats, options):
        depth = int(next(iter(scheme)).split(".")[2])
        process["peak"] = 1000 + weights + activation[depth]
        return real_step(model, scheme, batch, repeats, options)

    monkeypatch.setattr(costs_module, "_wrapped_step_s", step)
    monkeypatch.setattr(costs_module, "peak_memory_mb", lambda device: process["peak"])
    monkeypatch.setattr(costs_module, "current_memory_mb", lambda device: 1000 + weights)
    monkeypatch.setattr(costs_module, "start_measured_phase", lambda device: True)
    per_layer = activation[2] - activation[3]
    budget = 1000 + weights + activation[3] + 1.5 * per_layer
    bounded = profile_costs(model, **shape, budget_mb=budget)
    assert bounded.overhead_mb == pytest.approx(1000)
    assert bounded.overhead_mb_by_cut == pytest.approx([1000] * 4)  # untimed cuts get the largest overhead
    assert bounded.settings["depths_measured"] == [2, 3] and bounded.settings["untimed_depths"] == [0, 1]
    assert bounded.activation_mb_by_cut == pytest.approx(activation, rel=1e-6)
    assert bounded.base_memory_mb(1) > budget >= bounded.base_memory_mb(2)
    assert bounded.settings["full_step"] == "estimated"  # a full step (cut 0) would not fit either


def test_a_budget_below_one_step_is_refused_naming_what_training_needs():
    with pytest.raises(ValueError, match=r"budget is below what training needs at all.*weights"):
        profile_costs(tiny_llama(), batch_size=2, seq_len=16, repeats=1, progress=False, budget_mb=1.0)


def test_the_full_step_is_timed_without_optimizer_state_or_kept_gradients():
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    profile = profile_costs(model, batch_size=2, seq_len=16, depths=[3], repeats=1, progress=False)
    assert profile.settings["full_step"] == "timed" and profile.full_step_s > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_a_checkpointed_profile_keeps_one_hidden_state_per_layer_above_the_cut():
    model = tiny_llama()
    shape = {"batch_size": 2, "seq_len": 16, "depths": [0, 3], "repeats": 1, "progress": False}
    plain = profile_costs(model, **shape)
    checkpointed = profile_costs(model, **shape, gradient_checkpointing=True)
    assert checkpointed.settings["gradient_checkpointing"] and not plain.settings["gradient_checkpointing"]
    # what each extra layer above the cut keeps: all its saved activations without checkpointing, only its input
    # hidden state (batch x seq x hidden fp32 values) with it
    hidden_mb = 2 * 16 * model.config.hidden_size * 4 / 2**20
    plain_per_layer = plain.activation_mb_by_cut[0] - plain.activation_mb_by_cut[1]
    checkpointed_per_layer = checkpointed.activation_mb_by_cut[0] - checkpointed.activation_mb_by_cut[1]
    assert checkpointed_per_layer == pytest.approx(hidden_mb)
    assert plain_per_layer > 4 * checkpointed_per_layer
    # the profile measures what was asked whatever the model was left with, and gives the model its setting back
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert profile_costs(model, **shape).activation_mb_by_cut == plain.activation_mb_by_cut
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
