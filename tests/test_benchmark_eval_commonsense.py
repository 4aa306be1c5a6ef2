"""Smoke test of benchmarks/eval_commonsense.py on a tiny model and tiny commonsense-shaped data: it trains and
saves an adapter, then scores base and adapter on every task through pock-eval (no assertion on the accuracies)."""

from __future__ import annotations

import json

from .tiny import load_benchmark, save_tiny_checkpoint, write_commonsense


def test_eval_commonsense_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_commonsense(data, rows=12)
    piqa = [  # PIQA has a test split only, as in ../shared/data
        {"instruction": f"Goal {i}?\n\nAnswer format: solution1/solution2", "input": "",
         "output": f"the correct answer is solution{i % 2 + 1}", "answer": f"solution{i % 2 + 1}"}
        for i in range(12)
    ]  # fmt: skip
    (data / "commonsense" / "piqa").mkdir()
    (data / "commonsense" / "piqa" / "test.json").write_text(json.dumps(piqa))
    out = tmp_path / "out"
    argv = ["--model", str(save_tiny_checkpoint(tmp_path / "tiny")), "--data-dir", str(data), "--steps", "2"]
    argv += ["--batch", "2", "--first-layer", "2", "--limit", "4", "--eval-batch", "4", "--output", str(out)]
    result = load_benchmark("eval_commonsense").main(argv)
    training = result["training"]
    assert training["steps"] == 2 and training["layers"] == "2-3" and training["trainable_params"] > 0
    assert (out / "adapter" / "adapter_config.json").exists() and json.loads((out / "training.json").read_text())
    summary = (out / "eval" / "summary.md").read_text()
    for task in ("boolq", "arc_easy", "openbookqa", "piqa", "boolq_gen", "piqa_gen"):
        assert f"| {task} |" in summary
