"""Smoke test of benchmarks/quality.py on a tiny model and tiny commonsense-shaped data: it plans, trains every
method, evaluates and writes well-formed outputs (no assertion on the accuracies themselves)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .tiny import save_tiny_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
OPTIONS = {"boolq": ["true", "false"], "arc_easy": [f"answer{i}" for i in range(1, 5)]}
OPTIONS["openbookqa"] = OPTIONS["arc_easy"]


def write_commonsense(root: Path, rows: int) -> None:
    for name, options in OPTIONS.items():
        for split in ("train", "test"):
            data = [
                {
                    "instruction": f"Question {i} of {name}?\n\nAnswer format: {'/'.join(options)}",
                    "input": "",
                    "output": f"the correct answer is {options[i % len(options)]}",
                    "answer": options[i % len(options)],
                }
                for i in range(rows)
            ]
            folder = root / "commonsense" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.json").write_text(json.dumps(data))


def test_quality_benchmark_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_quality", SCRIPT)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    write_commonsense(tmp_path / "data", rows=24)
    out = tmp_path / "out"
    # on a tiny model step times are noise (a Pock step can cost more than a full one): a generous time budget
    report = quality.main(
        ["--model", str(save_tiny_checkpoint(tmp_path / "tiny")), "--data-dir", str(tmp_path / "data")]
        + ["--steps", "3", "--batch", "2", "--max-length", "256", "--budgets", "50", "--sensitivity-steps", "1"]
        + ["--validation-rows", "8", "--limit", "6", "--eval-batch", "4", "--output", str(out)]
    )
    systems = [row["system"] for row in report["results"]]
    assert (
        systems[0] == "base" and systems[1].startswith("pock (budget 50") and "full" in systems and "lora" in systems
    )
    for row in report["results"]:
        for task in OPTIONS:
            assert 0.0 <= row["eval"][task]["value"] <= 1.0 and 0.0 < row["eval"][task]["majority"] <= 1.0
    assert json.loads((out / "quality.json").read_text())["results"][0]["system"] == "base"
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG" and (out / "sensitivity.json").exists()
    assert (out / "quality.md").read_text().count("\n") == len(systems) + 3
