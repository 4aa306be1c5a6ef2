"""Every bad scheme or option raises ValueError naming the entry and what is valid."""

from __future__ import annotations

import json

import pytest

from pock_hf import PockConfig, get_pock_model

from .tiny import tiny_llama

GOOD = "model.layers.2.mlp.up_proj"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": {}}, r"scheme is empty"),
        ({"scheme": {GOOD: 0}}, rf"{GOOD}.*outside \(0, 1\]"),
        ({"scheme": {GOOD: 1.5}}, rf"{GOOD}.*outside \(0, 1\]"),
        ({"scheme": {GOOD: -0.25}}, rf"{GOOD}.*outside \(0, 1\]"),
        ({"scheme": {GOOD: float("nan")}}, rf"{GOOD}.*not a number"),
        ({"scheme": {GOOD: "half"}}, rf"{GOOD}.*not a number"),
        ({"scheme": {GOOD: True}}, rf"{GOOD}.*not a number"),
        ({"scheme": {"": 0.5}}, r"non-empty strings"),
        ({"scheme": {GOOD: 0.5}, "channel_axis": "rows"}, r"'rows'.*\('out', 'in'\)"),
        ({"scheme": {GOOD: 0.5}, "channel_selection": "random"}, r"'random'.*\('first', 'magnitude'\)"),
        ({"scheme": {GOOD: 0.5}, "channel_indices": {"lm_head": [0]}}, r"'lm_head'.*not in the scheme"),
        ({"scheme": 3}, r"dict or a path"),
    ],
)
def test_bad_config_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PockConfig(**kwargs)


@pytest.mark.parametrize(
    ("scheme", "extra", "message"),
    [
        (
            {"model.layers.2.mlp.up_prj": 0.5},
            {},
            r"'model\.layers\.2\.mlp\.up_prj'.*Did you mean 'model\.layers\.2\.mlp\.up_proj'",
        ),
        ({"model.layers.9.mlp.up_proj": 0.5}, {}, r"'model\.layers\.9\.mlp\.up_proj' is not a module.*linear modules"),
        (
            {"model.layers.2.input_layernorm": 0.5},
            {},
            r"'model\.layers\.2\.input_layernorm' is a LlamaRMSNorm, not a linear",
        ),
        ({"model.layers.2.mlp": 0.5}, {}, r"'model\.layers\.2\.mlp' is a LlamaMLP, not a linear"),
        ({GOOD: 0.25}, {"channel_indices": {GOOD: [0, 1]}}, rf"channel_indices\[{GOOD!r}\].*needs 12"),
        ({GOOD: 0.25}, {"channel_indices": {GOOD: [0] * 12}}, r"12 indices \(1 distinct\)"),
        ({GOOD: 0.25}, {"channel_indices": {GOOD: list(range(40, 52))}}, r"integers in \[0, 48\)"),
    ],
)
def test_bad_scheme_for_model_raises_at_wrapping(scheme, extra, message):
    with pytest.raises(ValueError, match=message):
        get_pock_model(tiny_llama(), PockConfig(scheme=scheme, **extra))


def test_tied_lm_head_is_refused():
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with the input embeddings"):
        get_pock_model(tiny_llama(tie_word_embeddings=True), PockConfig(scheme={"lm_head": 0.5}))


def test_failed_wrap_leaves_model_untouched():
    model = tiny_llama()
    with pytest.raises(ValueError):
        get_pock_model(model, PockConfig(scheme={GOOD: 0.5, "model.layers.2.mlp.nope": 0.5}))
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[2].mlp.up_proj).__name__ == "Linear"


def test_scheme_from_file_plain_and_planner_shapes(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({GOOD: 0.5}))
    planned = tmp_path / "planned.json"
    planned.write_text(json.dumps({"scheme": {GOOD: 0.25}, "predicted_gain": 0.1}))
    assert PockConfig(scheme=str(plain)).scheme == {GOOD: 0.5}
    assert PockConfig(scheme=planned).scheme == {GOOD: 0.25}


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, r"does not exist"), ("{not json", r"not valid JSON"), ("[1, 2]", r"must hold a JSON object")],
)
def test_bad_scheme_file(tmp_path, content, message):
    path = tmp_path / "scheme.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        PockConfig(scheme=str(path))
    assert str(path) in str(error.value)


def test_bad_ratio_in_scheme_file_names_entry(tmp_path):
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps({GOOD: 2}))
    with pytest.raises(ValueError, match=rf"{GOOD}.*outside"):
        PockConfig(scheme=str(path))
