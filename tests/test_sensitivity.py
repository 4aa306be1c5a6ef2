"""Sensitivity measurement: the planted unit ranks first; tables round-trip exactly and know their model."""

from __future__ import annotations

import csv

import pytest
import torch

from pock_hf import PockConfig, get_pock_model
from pock_hf.planning import sensitivity
from pock_hf.planning.sensitivity import (
    _Proxy,
    evaluate_loss,
    example_losses,
    gradient_channel_indices,
    measure_sensitivity,
    prepare_measurement_data,
    train_scheme,
)
from pock_hf.planning.table import SensitivityTable

from .tiny import tiny_batch, tiny_llama

PLANTED_LAYER = 2
MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def planted_model():
    """A tiny Llama in which only the MLP of layer 2 can change the output: every attention block and every other
    MLP sees an all-zero input (its RMSNorm weight is zero), so updating them cannot move the loss."""
    model = tiny_llama()
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.zero_()
            if index != PLANTED_LAYER:
                layer.post_attention_layernorm.weight.zero_()
    return model


def examples(seeds) -> list[dict]:
    rows = []
    for seed in seeds:
        batch = tiny_batch(seed=seed)
        rows += [{k: v[i].tolist() for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    return rows


def measure(model, **kwargs):
    """Random token data cannot generalise, so the validation set is the training set: gains show fitting power."""
    settings = {"ratios": (0.5,), "modules": MODULES, "steps": 4, "lr": 1e-2, "batch_size": 2, "progress": False}
    data = examples(range(2))
    return measure_sensitivity(model, None, data, data, **{**settings, **kwargs})


@pytest.mark.parametrize("method", ["measured", "proxy"])
def test_planted_unit_ranks_first(method):
    table = measure(planted_model(), method=method)
    ranked = sorted(table.rows, key=lambda row: row.gain, reverse=True)
    assert (ranked[0].layer, ranked[0].module) in {(PLANTED_LAYER, "mlp.up_proj"), (PLANTED_LAYER, "mlp.down_proj")}
    assert ranked[0].gain > 0
    for row in table.rows:
        if row.layer != PLANTED_LAYER or row.module.startswith("self_attn"):
            # zero up to float rounding: the baseline uses the stock loss, trials the (equal) label-only loss
            assert row.gain == pytest.approx(0.0, abs=1e-5), row


def test_layer_granularity_ranks_the_planted_layer_first():
    table = measure(planted_model(), granularity="layer")
    assert {row.module for row in table.rows} == {"*"}
    assert max(table.rows, key=lambda row: row.gain).layer == PLANTED_LAYER


def test_measurement_is_deterministic_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = measure(model, layers=[1, 3])
    second = measure(model, layers=[1, 3])
    assert first.rows == second.rows
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "Linear"


def test_table_round_trips_exactly(tmp_path):
    table = measure(tiny_llama(), method="proxy", layers=[0, 3])
    table.to_json(tmp_path / "table.json")
    loaded = SensitivityTable.from_json(tmp_path / "table.json")
    assert loaded == table
    assert loaded.to_dict() == table.to_dict()
    table.to_csv(tmp_path / "table.csv")
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(table.rows) and float(rows[0]["gain"]) == table.rows[0].gain
    assert table.plot_heatmap(tmp_path / "heatmap.png").stat().st_size > 1000


def test_table_used_with_another_model_names_both_fingerprints():
    table = measure(tiny_llama(), method="proxy", layers=[0])
    table.check_model(tiny_llama())  # same weights: fine
    other = tiny_llama(seed=7)
    with pytest.raises(ValueError, match=table.model_fingerprint["digest"]) as error:
        table.check_model(other)
    assert "Measure it again" in str(error.value)


def test_bad_table_files(tmp_path):
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        SensitivityTable.from_json(tmp_path / "bad.json")
    (tmp_path / "future.json").write_text('{"format_version": 99, "rows": []}')
    with pytest.raises(ValueError, match="format version 99"):
        SensitivityTable.from_json(tmp_path / "future.json")


def test_gradient_channel_indices_feed_the_config():
    model = tiny_llama()
    table = measure(model, method="proxy", layers=[3])
    scheme = {"model.layers.3.mlp.up_proj": 0.25}
    indices = gradient_channel_indices(table, scheme)
    scores = torch.tensor(table.channel_importance["model.layers.3.mlp.up_proj"])
    assert indices["model.layers.3.mlp.up_proj"] == sorted(scores.topk(12).indices.tolist())
    wrapped = get_pock_model(model, PockConfig(scheme=scheme, channel_indices=indices))
    assert (
        list(wrapped.updated_modules["model.layers.3.mlp.up_proj"].channels) == indices["model.layers.3.mlp.up_proj"]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "guess"}, "method 'guess'"),
        ({"granularity": "head"}, "granularity 'head'"),
        ({"ratios": (0.0,)}, r"ratios must be in \(0, 1\]"),
        ({"modules": ("mlp.nope",)}, r"Unknown module\(s\) \['mlp.nope'\]"),
        ({"layers": [9]}, r"layers must be in \[0, 4\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure(tiny_llama(), **kwargs)


# --- the proxy estimates the optimizer that trains; memory stays bounded ---------------------------------------------

STEPS, LR, BATCH = 4, 1e-2, 2


def reference_gradients(model, batches, name: str) -> list[torch.Tensor]:
    """The gradient of the stock loss of each batch with respect to one weight, by plain autograd."""
    weight = model.get_submodule(name).weight
    weight.requires_grad_(True)
    gradients = [torch.autograd.grad(model(**batch).loss, weight)[0] for batch in batches]
    weight.requires_grad_(False)
    return gradients


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_proxy_gain_is_the_first_order_gain_of_the_optimizers_step(optimizer):
    """AdamW moves every weight by lr * sign(g): gain steps * lr * sum |g| over the top channels; SGD by lr * g:
    steps * lr * sum g^2. Channels are ranked by the same per-channel sums."""
    model, data = tiny_llama(), examples(range(2))
    name = "model.layers.3.mlp.up_proj"
    table = measure(model, method="proxy", layers=[3], modules=("mlp.up_proj",), proxy_optimizer=optimizer)
    batches = prepare_measurement_data(None, data, data, batch_size=BATCH, steps=STEPS, max_length=256, seed=0)
    gradient = torch.stack(reference_gradients(model, batches.train_batches, name)).mean(0)
    per_channel = (gradient.abs() if optimizer == "adamw" else gradient.square()).sum(dim=1)
    assert table.channel_importance[name] == pytest.approx(per_channel.tolist(), rel=1e-4, abs=1e-9)
    expected = STEPS * LR * per_channel.topk(24).values.sum().item()  # ratio 0.5 of 48 channels
    assert table.rows[0].gain == pytest.approx(expected, rel=1e-4)
    assert table.settings["proxy_optimizer"] == optimizer


def test_proxy_damage_is_the_second_order_estimate_on_replay_data():
    model, data, replay = tiny_llama(), examples(range(2)), examples(range(5, 6))
    name = "model.layers.2.mlp.down_proj"
    table = measure(model, method="proxy", layers=[2], modules=("mlp.down_proj",), replay_data=replay)
    batches = prepare_measurement_data(None, data, data, replay, batch_size=BATCH, steps=STEPS, max_length=256, seed=0)
    direction = torch.stack(reference_gradients(model, batches.train_batches, name)).mean(0).sign()
    rows = [{k: v[i : i + 1] for k, v in b.items()} for b in batches.replay_batches for i in range(len(b["labels"]))]
    replay_gradients = reference_gradients(model, rows, name)  # per example
    cross = (torch.stack(replay_gradients).mean(0) * direction).sum(dim=1)
    curvature = (torch.stack(replay_gradients).square().mean(0) * direction.square()).sum(dim=1)
    top = torch.tensor(table.channel_importance[name]).topk(16).indices  # ratio 0.5 of 32 channels
    displacement = STEPS * LR
    expected = -displacement * cross[top].sum() + displacement**2 / 2 * curvature[top].sum()
    assert table.rows[0].damage == pytest.approx(expected.item(), rel=1e-3, abs=1e-9)
    assert table.replay_baseline is not None


def recorded_groups(monkeypatch) -> list[list[str]]:
    """The module names of each group the proxy measures from now on, in order (filled as the test measures)."""
    groups, original = [], _Proxy._measure_group

    def record(self, names):
        groups.append(names)
        return original(self, names)

    monkeypatch.setattr(_Proxy, "_measure_group", record)
    return groups


def test_micro_batches_and_layer_groups_give_the_same_table(monkeypatch):
    model, replay = tiny_llama(), examples(range(5, 6))
    whole = measure(model, method="proxy", replay_data=replay)
    groups = recorded_groups(monkeypatch)
    layer_mb = sum(model.get_submodule(f"model.layers.0.{m}").weight.numel() * 4 for m in MODULES) / 2**20
    split = measure(model, method="proxy", replay_data=replay, micro_batch_size=1, max_grad_mb=2.5 * layer_mb)
    assert [len(group) for group in groups] == [8, 8]  # two layers of four modules, top first
    assert groups[0][0].startswith("model.layers.3.")
    for names in groups:  # never more than the allowed gradient memory at once
        held = sum(model.get_submodule(n).weight.numel() * 4 for n in names) / 2**20
        assert held <= 2.5 * layer_mb
    for a, b in zip(whole.rows, split.rows):
        assert (a.layer, a.module, a.ratio) == (b.layer, b.module, b.ratio)
        assert b.gain == pytest.approx(a.gain, rel=1e-4, abs=1e-9)
        assert b.damage == pytest.approx(a.damage, rel=1e-3, abs=1e-8)


def test_a_bf16_model_holds_its_gradients_in_bf16_so_a_group_holds_twice_the_weights(monkeypatch):
    # each gradient stays in its weight's dtype and its direction (a sign) takes its memory
    model, groups = tiny_llama().to(torch.bfloat16), recorded_groups(monkeypatch)
    layer_mb = sum(model.get_submodule(f"model.layers.0.{m}").weight.numel() * 2 for m in MODULES) / 2**20
    bf16 = measure(model, method="proxy", max_grad_mb=2.5 * layer_mb)
    assert [len(group) for group in groups] == [8, 8]
    whole = measure(tiny_llama().to(torch.bfloat16), method="proxy")
    assert [row.gain for row in bf16.rows] == pytest.approx([row.gain for row in whole.rows], rel=1e-3)


def held_memory(monkeypatch, mb: float) -> None:
    """The process holds `mb` MB now, as the proxy's allowance reads it."""
    monkeypatch.setattr(sensitivity, "current_memory_mb", lambda device: mb)


def test_a_budget_gives_the_proxy_smaller_groups_the_more_the_process_already_holds(monkeypatch):
    model, groups = tiny_llama(), recorded_groups(monkeypatch)
    held_memory(monkeypatch, 100.0)
    roomy = measure(model, method="proxy", budget_mb=150.0)
    sizes_roomy = [len(group) for group in groups]
    groups.clear()
    held_memory(monkeypatch, 149.0)
    layer_mb = sum(model.get_submodule(f"model.layers.0.{m}").weight.numel() * 4 for m in MODULES) / 2**20
    tight = measure(model, method="proxy", budget_mb=149.0 + 1.5 * layer_mb + working_mb(model))
    assert sizes_roomy == [16] and [len(group) for group in groups] == [4, 4, 4, 4]  # one layer at a time
    assert [row.gain for row in tight.rows] == pytest.approx([row.gain for row in roomy.rows], rel=1e-4)


def working_mb(model) -> float:
    """The tiny model's proxy working memory on `measure`'s data, as `proxy_gradient_allowance_mb` estimates it."""
    data = prepare_measurement_data(None, examples(range(2)), examples(range(2)), batch_size=2, steps=4,
                                    max_length=256, seed=0)  # fmt: skip
    held = sensitivity.current_memory_mb(torch.device("cpu"))
    by_layer = {layer: {f"model.layers.{layer}.{m}" for m in MODULES} for layer in range(4)}
    allowance = sensitivity.proxy_gradient_allowance_mb(model, data, None, held + 2000.0, by_layer)
    return 2000.0 - allowance / (1 - sensitivity.ALLOCATOR_SLACK_RATIO)


def test_a_budget_the_proxy_cannot_fit_fails_before_any_backward_and_an_explicit_allowance_wins(monkeypatch):
    model, groups = tiny_llama(), recorded_groups(monkeypatch)
    held_memory(monkeypatch, 1000.0)
    with pytest.raises(ValueError, match=r"cannot fit a 999 MB budget: the process holds 1,000 MB.*bigger machine"):
        measure(model, method="proxy", budget_mb=999.0)
    assert groups == []
    layer_mb = sum(model.get_submodule(f"model.layers.0.{m}").weight.numel() * 4 for m in MODULES) / 2**20
    measure(model, method="proxy", budget_mb=999.0, max_grad_mb=2.5 * layer_mb)
    assert [len(group) for group in groups] == [8, 8]


def test_measured_damage_is_the_replay_loss_increase_after_tuning_the_unit():
    model, data, replay = tiny_llama(), examples(range(2)), examples(range(5, 6))
    table = measure(model, layers=[1], modules=("mlp.up_proj",), replay_data=replay)
    batches = prepare_measurement_data(None, data, data, replay, batch_size=BATCH, steps=STEPS, max_length=256, seed=0)
    config = PockConfig(scheme={"model.layers.1.mlp.up_proj": 0.5})
    wrapped = train_scheme(model, config, batches.train_batches, LR, seed=0)
    after_task, after_replay = (
        evaluate_loss(wrapped, batches.eval_batches),
        evaluate_loss(wrapped, batches.replay_batches),
    )
    wrapped.unload()
    assert table.rows[0].gain == pytest.approx(table.baseline - after_task, abs=1e-6)
    assert table.rows[0].damage == pytest.approx(after_replay - table.replay_baseline, abs=1e-6)
    assert table.replay_baseline == pytest.approx(evaluate_loss(model, batches.replay_batches))


def test_evaluate_loss_matches_the_stock_loss_without_full_logits():
    model, batch = tiny_llama(), tiny_batch(seed=3, batch=3)
    batch["labels"][1, -4:] = -100  # rows of different labelled lengths
    expected = model(**batch).loss.item()
    assert evaluate_loss(model, [batch]) == pytest.approx(expected, rel=1e-5)
    sums, counts = example_losses(model, [batch])
    assert counts.tolist() == [(batch["labels"][i, 1:] != -100).sum().item() for i in range(3)]
    first = model(**{k: v[:1] for k, v in batch.items()}).loss.item()
    assert sums[0] / counts[0] == pytest.approx(first, rel=1e-5)
