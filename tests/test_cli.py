"""`pock sensitivity` and `pock plan` end to end on a tiny model and a tiny data file."""

from __future__ import annotations

import json

import pytest

from pock_hf import PockConfig
from pock_hf.cli import main
from pock_hf.planning.costs import CostProfile
from pock_hf.planning.table import SensitivityTable

from .tiny import save_tiny_checkpoint

ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(12)]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny-llama")
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS))
    return folder, data


def test_sensitivity_then_plan_write_what_they_promise(tiny_checkpoint, tmp_path, capsys):
    folder, data = tiny_checkpoint
    out = tmp_path / "sens" / "table.json"
    common = ["--model", str(folder), "--data", str(data), "--eval-rows", "4", "--steps", "2", "--batch-size", "4"]
    assert main(["sensitivity", *common, "--out", str(out), "--ratios", "0.5,1", "--profile-seq", "16"]) == 0
    assert {p.name for p in out.parent.iterdir()} == {"table.json", "table.csv", "table.png", "costs.json"}
    table = SensitivityTable.from_json(out)
    assert len(table.rows) == 4 * 2 and {row.module for row in table.rows} == {"*"}
    profile = CostProfile.from_json(out.parent / "costs.json")
    assert "top units" in capsys.readouterr().out

    scheme = tmp_path / "plan" / "scheme.json"
    costs = out.parent / "costs.json"
    # a budget is the process's peak: this test process holds far more than the tiny model, so it is set from the
    # measured profile (everything fits at cut 0 with a MB to spare)
    budget = f"{profile.base_memory_mb(0) + 1:.1f}"
    args = ["plan", "--table", str(out), "--costs", str(costs), "--budget-mb", budget, "--out", str(scheme)]
    assert main(args) == 0
    assert {p.name for p in scheme.parent.iterdir()} == {"scheme.json", "scheme.md", "scheme.png"}
    config = PockConfig(scheme=str(scheme))
    assert config.scheme and all(name.startswith("model.layers.") for name in config.scheme)


def test_sensitivity_with_depth_candidates_then_plan_picks_a_measured_one(tiny_checkpoint, tmp_path):
    folder, data = tiny_checkpoint
    out = tmp_path / "sens" / "table.json"
    common = ["--model", str(folder), "--data", str(data), "--eval-rows", "4", "--steps", "2", "--batch-size", "4"]
    common += ["--method", "proxy", "--granularity", "module", "--ratios", "0.5,1", "--profile-seq", "16"]
    depths = ["--depths", "0.5,1", "--blocks", "all,mlp", "--gradient-checkpointing", "--budget-mb", "100000"]
    assert main(["sensitivity", *common, *depths, "--out", str(out)]) == 0
    table = SensitivityTable.from_json(out)
    assert table.settings["scheme_candidates"] == "depths" and table.schemes
    assert CostProfile.from_json(out.parent / "costs.json").settings["gradient_checkpointing"] is True
    scheme = tmp_path / "plan" / "scheme.json"
    plan = ["plan", "--table", str(out), "--costs", str(out.parent / "costs.json"), "--budget-mb", "100000"]
    assert main([*plan, "--out", str(scheme)]) == 0
    chosen = json.loads(scheme.read_text())
    assert chosen["selection"] == "measured"
    assert sorted(map(tuple, chosen["units"])) in [sorted(map(tuple, s.units)) for s in table.schemes]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["plan", "--table", "missing.json", "--costs", "c.json", "--budget-mb", "9", "--out", "s.json"],
            "does not exist",
        ),
        (["plan", "--table", "t.json", "--costs", "c.json", "--out", "s.json"], "Give a budget"),
        (["plan", "--table", "t.json", "--costs", "c.json", "--device", "toaster", "--out", "s.json"], "toaster"),
    ],
)
def test_user_mistakes_give_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_data_file_is_named(tmp_path, capsys):
    assert main(["sensitivity", "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "t.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
