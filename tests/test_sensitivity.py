"""Sensitivity measurement: the planted unit ranks first; tables round-trip exactly and know their model."""

from __future__ import annotations

import csv

import pytest
import torch

from pock_hf import PockConfig, get_pock_model
from pock_hf.planning.sensitivity import gradient_channel_indices, measure_sensitivity
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
