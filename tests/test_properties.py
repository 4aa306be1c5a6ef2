"""Property tests: arbitrary rows, schemes, configs and table files either work or raise the documented error
(`DataFormatError` for data, `ValueError` for schemes, configs and files), never another exception."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pock_hf import PockConfig, get_pock_model
from pock_hf.data import IGNORE_INDEX, DataFormatError, check_row, load_instruction_rows, to_messages, tokenize_example
from pock_hf.planning.costs import CostProfile
from pock_hf.planning.table import SensitivityTable
from pock_hf.tuner.config import validate_scheme

from .conftest import byte_tokenizer
from .test_planner import random_instance
from .tiny import tiny_llama

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENIZER = byte_tokenizer()

# text with anything in it: control characters, template markers, unpaired surrogates
text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None), max_size=10),
    st.sampled_from(["", " ", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>", "\n\n", "\u2028"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), text)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8
)
roles = st.sampled_from(["system", "user", "assistant", "bot", "", None])
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": roles, "content": st.one_of(text, scalars)}),
        st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3),
        json_values,
    ),
    max_size=5,
)
row_fields = st.sampled_from(["instruction", "input", "output", "messages", "prompt"])
alpaca_rows = st.fixed_dictionaries(
    {"instruction": text, "output": text}, optional={"input": st.one_of(text, st.none())}
)
rows = st.one_of(
    json_values,
    st.dictionaries(row_fields, st.one_of(text, json_values), max_size=4),
    alpaca_rows,
    st.fixed_dictionaries({"messages": messages}),
)


def mostly(valid, anything):
    """Valid values three times as often as anything else, so that the success path is exercised too."""
    return st.one_of(valid, valid, valid, anything)


@FEW
@given(row=rows, max_length=st.integers(1, 160), system_prompt=st.one_of(st.none(), text))
def test_any_row_tokenizes_or_raises_data_format_error(row, max_length, system_prompt):
    try:
        shape = check_row(row)
    except DataFormatError:
        return
    assert shape in ("alpaca", "chat")
    chat = to_messages(row, system_prompt=system_prompt)
    assert chat[-1]["role"] == "assistant" or shape == "chat"
    try:
        example = tokenize_example(row, TOKENIZER, max_length=max_length, system_prompt=system_prompt)
    except DataFormatError:
        return
    if example is None:  # dropped (and counted by tokenize_rows): prompt fills max_length, or empty answer
        return
    assert 1 <= len(example["input_ids"]) <= max_length
    assert len(example["labels"]) == len(example["attention_mask"]) == len(example["input_ids"])
    assert any(label != IGNORE_INDEX for label in example["labels"])
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example["labels"], example["input_ids"]))


@settings(max_examples=25, deadline=None)
@given(
    lines=st.lists(mostly(alpaca_rows.map(json.dumps), st.one_of(rows.map(json.dumps), text)), min_size=1, max_size=3),
    suffix=st.sampled_from([0, 1]),
)
def test_any_data_file_loads_or_raises_data_format_error(lines, suffix):
    with tempfile.TemporaryDirectory() as folder:
        if suffix:
            path = Path(folder) / "rows.jsonl"
            path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        else:
            path = Path(folder) / "rows.json"
            path.write_text("[" + ",".join(lines) + "]", encoding="utf-8", errors="surrogatepass")
        try:
            loaded = load_instruction_rows(path)
        except DataFormatError:
            return
        assert loaded and all(check_row(row) in ("alpaca", "chat") for row in loaded)


# --- schemes and configs --------------------------------------------------------------------------------------------

VALID_NAMES = [f"model.layers.{i}.{m}" for i in range(4) for m in ("mlp.up_proj", "self_attn.k_proj")] + ["lm_head"]
names = st.one_of(st.sampled_from(VALID_NAMES), st.sampled_from(["model.layers.9.mlp.up_proj", "model.layers.1", ""]))
ratios = st.one_of(st.floats(-1, 2), st.sampled_from([0.5, 1, 1e-9, math.inf, math.nan]), json_values)
schemes = mostly(
    st.dictionaries(st.sampled_from(VALID_NAMES), st.floats(1e-3, 1), min_size=1, max_size=3),
    st.one_of(st.dictionaries(names, ratios, max_size=3), st.dictionaries(text, ratios, max_size=2), json_values),
)
index_values = st.one_of(st.integers(-2, 70), st.floats(0, 4), text, st.booleans(), st.lists(st.integers(0, 3)))
indices = mostly(
    st.none(),
    st.one_of(st.dictionaries(names, st.one_of(st.lists(index_values), json_values), max_size=2), json_values),
)


@FEW
@given(scheme=st.dictionaries(st.one_of(text, st.integers(), st.none()), ratios, max_size=4))
def test_any_scheme_dict_validates_or_raises_value_error(scheme):
    try:
        checked = validate_scheme(scheme)
    except ValueError:
        return
    assert checked and all(0 < ratio <= 1 and isinstance(ratio, float) for ratio in checked.values())


@FEW
@given(
    scheme=schemes,
    axis=mostly(st.sampled_from(["out", "in"]), json_values),
    selection=mostly(st.sampled_from(["first", "magnitude"]), json_values),
    chunk=mostly(st.integers(-2, 4096), json_values),
    quantize=mostly(st.none(), st.one_of(st.sampled_from(["int8", "nf4"]), text)),
    channel_indices=indices,
    flag=mostly(st.booleans(), json_values),
)
def test_any_config_wraps_or_raises_value_error(scheme, axis, selection, chunk, quantize, channel_indices, flag):
    kwargs = {"channel_axis": axis, "channel_selection": selection, "loss_chunk_size": chunk, "train_norms": flag}
    try:
        config = PockConfig(scheme=scheme, quantize_frozen=quantize, channel_indices=channel_indices, **kwargs)
    except ValueError:
        return
    if config.quantize_frozen is not None:
        return  # bitsandbytes quantization is tested in its own file; here only what the parser accepts matters
    try:
        model = get_pock_model(tiny_llama(), config)
    except ValueError:
        return
    assert set(model.updated_modules) == set(config.scheme)


@settings(max_examples=40, deadline=None)
@given(value=json_values)
def test_any_json_scheme_file_loads_or_raises_value_error(value):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scheme.json"
        path.write_text(json.dumps(value))
        try:
            config = PockConfig(scheme=str(path))
        except ValueError:
            return
    # what loads is a valid scheme: module names to ratios in (0, 1]
    assert config.scheme and all(isinstance(k, str) and 0 < v <= 1 for k, v in config.scheme.items())


# --- table and cost-profile files -------------------------------------------------------------------------------


def edits(data: dict):
    """Strategy: a JSON object derived from `data` by replacing, removing or adding a field, at the top level or
    inside a nested object or list."""

    def apply(choice):
        kind, path_seed, value = choice
        copy = json.loads(json.dumps(data))
        target, key = copy, None
        for step in path_seed:
            container = target if key is None else target[key]
            if isinstance(container, dict) and container:
                target, key = container, sorted(container)[step % len(container)]
            elif isinstance(container, list) and container:
                target, key = container, step % len(container)
            else:
                break
        if key is None:
            copy["unexpected"] = value
        elif kind == "replace":
            target[key] = value
        elif kind == "remove" and isinstance(target, dict):
            del target[key]
        elif isinstance(target, dict):
            target[f"{key}_extra"] = value
        return copy

    return st.tuples(
        st.sampled_from(["replace", "remove", "add"]),
        st.lists(st.integers(0, 50), min_size=1, max_size=4),
        json_values,
    ).map(apply)


TABLE, COSTS = random_instance(0)


@FEW
@given(data=edits(json.loads(json.dumps(TABLE.to_dict()))))
def test_any_edited_table_loads_or_raises_value_error(data):
    try:
        table = SensitivityTable.from_dict(data, source="t.json")
    except ValueError:
        return
    assert all(isinstance(row.layer, int) and isinstance(row.gain, float) for row in table.rows)


@FEW
@given(data=edits(json.loads(json.dumps(asdict(COSTS)))))
def test_any_edited_cost_profile_loads_or_raises_value_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "costs.json"
        path.write_text(json.dumps(data))
        try:
            costs = CostProfile.from_json(path)
        except ValueError:
            return
    assert len(costs.step_s_by_cut) == costs.num_layers


@pytest.mark.parametrize("name", ["table", "costs"])
def test_unedited_files_load(name):
    if name == "table":
        assert SensitivityTable.from_dict(json.loads(json.dumps(TABLE.to_dict()))) == TABLE
    else:
        with tempfile.TemporaryDirectory() as folder:
            assert CostProfile.from_json(COSTS.to_json(Path(folder) / "c.json")) == COSTS
