"""Helpers for the recipe tests (no tests here): a tiny local model folder, tiny instruction data, a config writer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune.py"
CONFIGS = ROOT / "recipes" / "configs"

ANSWERS = ["Biscotti", "Ljubljana", "saffron", "bassoon", "Teodor", "Kirkwall"]


def load_recipe_module():
    """`recipes/finetune.py` as a module (the recipes folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("finetune_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_rows(path: Path, count: int = 24) -> Path:
    rows = [
        {"instruction": f"Question {i}: what is thing {i % len(ANSWERS)}?", "output": f"It is {ANSWERS[i % 6]}."}
        for i in range(count)
    ]
    path.write_text(json.dumps(rows))
    return path


def write_config(path: Path, model: Path, data: Path, output: Path, **sections) -> Path:
    """A small config for the tiny model: pock on layers 2-3, a few steps; `sections` update it per test."""
    config = {
        "method": "pock",
        "model": {"name": str(model)},
        "data": {"train": str(data), "eval_rows": 4, "max_length": 96},
        "pock": {"layers": "2-3", "ratio": 0.5},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "seed": 0},
        "output": {"dir": str(output)},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config))
    return path
