"""The pock-eval command: help, task list, clear errors with exit status 2; packaging of pock_eval from eval/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pock_eval.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_and_task_list_from_another_directory(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pock_eval.cli", "--list-tasks"], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0 and "boolq_gen" in run.stdout and "pairwise" in run.stdout
    assert main(["--list-tasks"]) == 0


def test_bad_data_prints_file_line_field_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Sky?\\n\\nAnswer format: true/false", "output": "", "answer": "maybe"}\n')
    assert main(["--tasks", str(bad), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pock-eval: error:") and "bad.jsonl, line 1: field 'answer'" in error
    assert "Traceback" not in error
    assert main(["--tasks", "no_such_task"]) == 2
    assert main([]) == 2


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "pock_hf").rglob("__init__.py")}
    assert on_disk | {"pock_eval"} <= set(config["packages"]), "add new pock_hf subpackages to pyproject.toml"
    assert config["package-dir"]["pock_eval"] == "eval" and "tasks/*.yaml" in config["package-data"]["pock_eval"]
