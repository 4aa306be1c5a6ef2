"""Every bad input a user can hand pock_hf, in one table: the error type, and the file / line / row / field / module
the message must name. Plus: a malicious pickle where an adapter, table, scheme or model is expected is never run."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from pock_hf import PockConfig, get_pock_model, load_pock_adapter
from pock_hf.cli import main
from pock_hf.data import DataFormatError, load_instruction_rows, tokenize_rows
from pock_hf.data.default_model import load_model_and_tokenizer
from pock_hf.planning.costs import CostProfile
from pock_hf.planning.planner import Plan, make_plan
from pock_hf.planning.sensitivity import measure_sensitivity
from pock_hf.planning.table import SensitivityTable
from pock_hf.tuner.config import check_adapter_folder

from .conftest import byte_tokenizer
from .test_planner import random_instance
from .tiny import tiny_llama

ROW = {"instruction": "Say hi.", "output": "Hi."}
GOOD = "model.layers.2.mlp.up_proj"
MARKER = "pwned.txt"


# --- builders: each writes what a case needs under `tmp` and returns the path ------------------------------------


def text_file(name: str, content: str | bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    return build


def jsonl(*lines: object) -> str:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def table_file(name: str, change: Callable[[dict], None]) -> Callable[[Path], Path]:
    """A valid sensitivity table (or, for a name starting with "costs" / "plan", cost profile / plan) with `change`
    applied to its JSON."""

    def build(tmp: Path) -> Path:
        table, costs = random_instance(0)
        if name.startswith("costs"):
            data = asdict(costs)
        elif name.startswith("plan"):
            data = make_plan(table, costs, budget_mb=1000).to_dict()
        else:
            data = table.to_dict()
        data = json.loads(json.dumps(data))  # what a reader of the file sees: lists, not tuples
        change(data)
        path = tmp / name
        path.write_text(json.dumps(data))
        return path

    return build


def adapter(change: Callable[[Path], None] = lambda folder: None) -> Callable[[Path], Path]:
    """A saved Pock adapter for `tiny_llama()` with `change` applied to its folder."""

    def build(tmp: Path) -> Path:
        model = get_pock_model(tiny_llama(), PockConfig(scheme={GOOD: 0.5}, init_weights=False))
        folder = tmp / "adapter"
        model.save_pretrained(folder)
        change(folder)
        return folder

    return build


def edit_config(**entries) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))

    return change


def cut_weights(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def pickle_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, folder / "adapter_model.bin")


# --- the table ------------------------------------------------------------------------------------------------------

# (id, build(tmp) -> path, action(path), error type, what the message must contain; "{path}" stands for the path)
CASES = [
    # instruction data files
    ("data: missing", lambda t: t / "nope.json", load_instruction_rows, FileNotFoundError, ["{path}"]),
    ("data: folder", lambda t: t, load_instruction_rows, FileNotFoundError, ["{path}"]),
    ("data: wrong suffix", text_file("rows.csv", "a,b"), load_instruction_rows, DataFormatError, ["{path}", ".csv"]),
    ("data: empty", text_file("rows.json", ""), load_instruction_rows, DataFormatError, ["{path}", "empty"]),
    ("data: blank lines", text_file("rows.jsonl", "\n \n"), load_instruction_rows, DataFormatError, ["empty"]),
    ("data: empty list", text_file("rows.json", "[]"), load_instruction_rows, DataFormatError, ["holds no rows"]),
    (
        "data: Latin-1 bytes",
        text_file("rows.jsonl", jsonl(ROW).encode() + '{"instruction": "café", "output": "x"}\n'.encode("latin-1")),
        load_instruction_rows,
        DataFormatError,
        ["{path}, line 2: not UTF-8", "save the file as UTF-8"],
    ),
    (
        "data: UTF-16",
        text_file("rows.json", json.dumps([ROW]).encode("utf-16")),
        load_instruction_rows,
        DataFormatError,
        ["{path}, line 1: not UTF-8"],
    ),
    (
        "data: JSON cut short",
        text_file("rows.json", json.dumps([ROW, ROW])[:-9]),
        load_instruction_rows,
        DataFormatError,
        ["{path}: not valid JSON (line 1, column"],
    ),
    (
        "data: JSONL bad line",
        text_file("rows.jsonl", jsonl(ROW, ROW, '{"instruction": "a",')),
        load_instruction_rows,
        DataFormatError,
        ["{path}, line 3: not valid JSON"],
    ),
    (
        "data: object not list",
        text_file("rows.json", json.dumps(ROW)),
        load_instruction_rows,
        DataFormatError,
        ["{path}", "got a dict", ".jsonl"],
    ),
    (
        "data: row missing field",
        text_file("rows.json", json.dumps([ROW, {"instruction": "x"}])),
        load_instruction_rows,
        DataFormatError,
        ["{path}, row 1 (0-based): missing field 'output'"],
    ),
    (
        "data: row field type",
        text_file("rows.jsonl", jsonl(ROW, {"instruction": "x", "output": ["y"]})),
        load_instruction_rows,
        DataFormatError,
        ["{path}, line 2: field 'output' must be a string, got list"],
    ),
    (
        "data: chat role",
        text_file("rows.jsonl", jsonl({"messages": [{"role": "human", "content": "x"}]})),
        load_instruction_rows,
        DataFormatError,
        ["{path}, line 1: field 'messages[0].role'"],
    ),
    (
        "data: unpaired surrogate",
        text_file("rows.jsonl", jsonl(ROW, '{"instruction": "a\\ud800", "output": "b"}')),
        load_instruction_rows,
        DataFormatError,
        ["{path}, line 2: field 'instruction' holds an unpaired surrogate"],
    ),
    (
        "data: value Arrow cannot hold",
        text_file("rows.json", json.dumps([{**ROW, "id": 2**70}])),
        load_instruction_rows,
        DataFormatError,
        ["{path}: the datasets library cannot read this file"],
    ),
    # scheme files and configs
    ("scheme: missing file", lambda t: t / "s.json", lambda p: PockConfig(scheme=str(p)), ValueError, ["{path}"]),
    (
        "scheme: file cut short",
        text_file("s.json", json.dumps({GOOD: 0.5})[:-3]),
        lambda p: PockConfig(scheme=str(p)),
        ValueError,
        ["{path}", "not valid JSON", "cut short"],
    ),
    (
        "scheme: ratio out of range",
        text_file("s.json", json.dumps({GOOD: 1.5})),
        lambda p: PockConfig(scheme=str(p)),
        ValueError,
        [GOOD, "outside (0, 1]"],
    ),
    (
        "scheme: module not in model",
        lambda t: t,
        lambda p: get_pock_model(tiny_llama(), PockConfig(scheme={"model.layers.2.mlp.up_prj": 0.5})),
        ValueError,
        ["'model.layers.2.mlp.up_prj'", f"Did you mean '{GOOD}'"],
    ),
    # sensitivity tables, cost profiles, plans
    ("table: missing", lambda t: t / "t.json", SensitivityTable.from_json, ValueError, ["{path}", "does not exist"]),
    (
        "table: cut short",
        text_file("t.json", '{"format_version": 1, "rows": [{"layer": 0, "mod'),
        SensitivityTable.from_json,
        ValueError,
        ["{path}", "not valid JSON", "cut short"],
    ),
    (
        "table: newer format",
        table_file("t.json", lambda d: d.update(format_version=3)),
        SensitivityTable.from_json,
        ValueError,
        ["{path}", "format version 3", "newer pock_hf"],
    ),
    (
        "table: no format version",
        table_file("t.json", lambda d: d.pop("format_version")),
        SensitivityTable.from_json,
        ValueError,
        ["{path}", "no 'format_version'"],
    ),
    (
        "table: row field type",
        table_file("t.json", lambda d: d["rows"][3].update(gain="high")),
        SensitivityTable.from_json,
        ValueError,
        ["{path}", "field 'rows[3].gain' must be a number, got a string"],
    ),
    (
        "table: row missing field",
        table_file("t.json", lambda d: d["rows"][0].pop("ratio")),
        SensitivityTable.from_json,
        ValueError,
        ["{path}", "missing field 'rows[0].ratio'"],
    ),
    (
        "table: unknown field",
        table_file("t.json", lambda d: d.update(baselin=1.0)),
        SensitivityTable.from_json,
        ValueError,
        ["{path}", "unknown field 'baselin'", "did you mean 'baseline'"],
    ),
    (
        "costs: newer format",
        table_file("costs.json", lambda d: d.update(format_version=7)),
        CostProfile.from_json,
        ValueError,
        ["{path}", "format version 7", "newer pock_hf"],
    ),
    (
        "costs: list length",
        table_file("costs.json", lambda d: d["step_s_by_cut"].pop()),
        CostProfile.from_json,
        ValueError,
        ["{path}", "'step_s_by_cut' has 3 entries; num_layers is 4"],
    ),
    (
        "costs: field type",
        table_file("costs.json", lambda d: d.update(module_shapes={"mlp.up_proj": [4, "wide"]})),
        CostProfile.from_json,
        ValueError,
        ["{path}", "field 'module_shapes[mlp.up_proj][1]' must be an integer"],
    ),
    (
        "plan: unit shape",
        table_file("plan.json", lambda d: d["units"].append([1, "mlp.up_proj"])),
        Plan.from_json,
        ValueError,
        ["{path}", "field 'units[", "must be a list of 3 items"],
    ),
    (
        "plan: budget below the minimum",
        lambda t: t,
        lambda p: make_plan(*random_instance(0), budget_mb=5),
        ValueError,
        ["budget_mb=5", "the smallest feasible memory budget is"],
    ),
    # adapters
    ("adapter: missing folder", lambda t: t / "nope", check_adapter_folder, ValueError, ["{path}", "does not exist"]),
    (
        "adapter: config cut short",
        adapter(lambda f: (f / "adapter_config.json").write_text('{"peft_type": "POCK", "sche')),
        check_adapter_folder,
        ValueError,
        ["{path}/adapter_config.json", "not valid JSON"],
    ),
    (
        "adapter: not Pock",
        adapter(edit_config(peft_type="LORA")),
        check_adapter_folder,
        ValueError,
        ["{path}/adapter_config.json", "'LORA'", "not a Pock adapter"],
    ),
    (
        "adapter: newer config key",
        adapter(edit_config(channel_groups=4)),
        check_adapter_folder,
        ValueError,
        ["{path}/adapter_config.json", "['channel_groups']", "newer pock_hf"],
    ),
    (
        "adapter: no fingerprint",
        adapter(edit_config(base_model_fingerprint=None)),
        check_adapter_folder,
        ValueError,
        ["{path}/adapter_config.json", "no base_model_fingerprint"],
    ),
    (
        "adapter: weights cut short",
        adapter(cut_weights),
        check_adapter_folder,
        ValueError,
        ["{path}/adapter_model.safetensors", "damaged or cut short"],
    ),
    (
        "adapter: weights cut short, through PEFT's own loader",
        adapter(cut_weights),
        lambda p: PeftModel.from_pretrained(tiny_llama(), p),
        ValueError,
        ["{path}/adapter_model.safetensors", "damaged or cut short"],
    ),
    (
        "adapter: pickle weights only",
        adapter(pickle_weights),
        check_adapter_folder,
        ValueError,
        ["{path}", "no adapter_model.safetensors", "adapter_model.bin, a pickle"],
    ),
    (
        "adapter: other base model",
        adapter(),
        lambda p: load_pock_adapter(tiny_llama(vocab_size=100), p),
        ValueError,
        ["{path}", "made for another base model", "'vocab_size': (96, 100)"],
    ),
    (
        "adapter: other module shape",
        adapter(),
        lambda p: load_pock_adapter(tiny_llama(intermediate_size=40), p),
        ValueError,
        ["{path}", f"'{GOOD}' weight is [48, 32]", "[40, 32]"],
    ),
]


@pytest.mark.parametrize(
    ("build", "action", "error", "parts"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_a_clear_error(tmp_path, build, action, error, parts):
    path = build(tmp_path)
    with pytest.raises(error) as raised:
        action(path)
    message = str(raised.value)
    for part in parts:
        assert part.replace("{path}", str(path)) in message, message


def test_good_inputs_of_the_same_builders_load(tmp_path):
    """The builders make valid files unless changed: the cases above fail for the reason they name."""
    assert load_instruction_rows(text_file("rows.jsonl", b"\xef\xbb\xbf" + jsonl(ROW, ROW).encode())(tmp_path)) == [
        ROW,
        ROW,
    ]  # a UTF-8 byte-order mark (Windows editors) is fine
    SensitivityTable.from_json(table_file("t.json", lambda d: None)(tmp_path))
    CostProfile.from_json(table_file("costs.json", lambda d: None)(tmp_path))
    Plan.from_json(table_file("plan.json", lambda d: None)(tmp_path))
    folder = adapter()(tmp_path)
    check_adapter_folder(folder)
    assert load_pock_adapter(tiny_llama(), folder).updated_modules[GOOD].ratio == 0.5


def test_answers_truncated_away_are_dropped_and_counted_never_silently(caplog):
    long_prompt = {"instruction": "word " * 40, "output": "Yes."}
    examples, report = tokenize_rows([ROW, long_prompt, long_prompt], byte_tokenizer(), max_length=64)
    assert (len(examples), report.kept, report.dropped_too_long) == (1, 1, 2)
    assert "dropped 2 whose prompt alone fills max_length" in caplog.text
    with pytest.raises(ValueError, match=r"No usable training example left .*dropped 1 whose prompt"):
        measure_sensitivity(tiny_llama(vocab_size=260), byte_tokenizer(), [long_prompt], [ROW], max_length=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
        ({"lr": float("nan")}, "lr must be a positive number, got nan"),
        ({"layers": []}, r"layers must be in \[0, 4\), got \[\]"),
    ],
)
def test_bad_measurement_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_sensitivity(tiny_llama(vocab_size=260), byte_tokenizer(), [ROW], [ROW], **kwargs)


# --- the command line -----------------------------------------------------------------------------------------------


def test_cli_names_the_bad_file_without_a_traceback_and_debug_shows_it(tmp_path, capsys):
    data = text_file("rows.jsonl", jsonl(ROW).encode() + b'{"instruction": "caf\xe9"}\n')(tmp_path)
    argv = ["sensitivity", "--data", str(data), "--out", str(tmp_path / "t.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 2: not UTF-8" in err and "Traceback" not in err
    with pytest.raises(DataFormatError):
        main(["--debug", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps: expected a positive integer, got '0'"),
        (["--eval-rows", "-3"], "--eval-rows: expected a positive integer, got '-3'"),
        (["--lr", "inf"], "--lr: expected a positive number, got 'inf'"),
    ],
)
def test_cli_refuses_non_positive_settings(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["sensitivity", "--data", "d.json", "--out", str(tmp_path / "t.json"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_missing_model_folder_is_one_line(tmp_path, capsys):
    data = text_file("rows.json", json.dumps([ROW] * 40))(tmp_path)
    argv = ["sensitivity", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "t")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no-model" in err and "Traceback" not in err


# --- malicious pickles ----------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates the marker file: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def evil(marker: Path) -> dict:
    return {"base_model.model.model.layers.2.mlp.up_proj.pock_delta": Payload(marker)}


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_as_adapter_weights_is_never_run(tmp_path, writer):
    folder = adapter()(tmp_path)
    marker = tmp_path / MARKER
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump(evil(marker), f) if writer == "pickle" else torch.save(evil(marker), f)
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle"):
        load_pock_adapter(tiny_llama(), folder)
    # PEFT's own path goes through PockConfig.from_pretrained, which checks the folder the same way
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle"):
        PeftModel.from_pretrained(tiny_llama(), folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "load",
    [
        SensitivityTable.from_json,
        CostProfile.from_json,
        Plan.from_json,
        lambda path: PockConfig(scheme=str(path)),
        check_adapter_folder,
    ],
    ids=["table", "costs", "plan", "scheme", "adapter config"],
)
@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_as_json_file_is_never_run(tmp_path, load, protocol):
    marker = tmp_path / MARKER
    payload = pickle.dumps(evil(marker), protocol=protocol)
    if load is check_adapter_folder:
        folder = adapter()(tmp_path)
        (folder / "adapter_config.json").write_bytes(payload)
        path = folder
    else:
        path = tmp_path / "file.json"
        path.write_bytes(payload)
    with pytest.raises(ValueError, match="not UTF-8|not valid JSON"):
        load(path)
    assert not marker.exists()


def test_malicious_pickle_as_model_checkpoint_is_never_run(tmp_path):
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / MARKER
    torch.save(evil(marker), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"{folder}: the checkpoint is a pickle"):
        load_model_and_tokenizer(folder)
    assert not marker.exists()
