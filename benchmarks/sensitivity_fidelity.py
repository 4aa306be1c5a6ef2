"""Sensitivity fidelity on SmolLM2-135M-Instruct with the BoolQ + ARC-Easy train splits.

    python benchmarks/sensitivity_fidelity.py --output runs/fidelity          # ~25 min on a 2-core CPU

1. Measures a layer-granularity table in measured mode (fine-tune each layer at one ratio, validation loss) and in
   proxy mode (first-order, a few backward passes), timing both, and reports their Spearman rank correlation.
2. Profiles this device's costs, plans a scheme from the measured table at the predicted memory of a hand-made
   "last-k layers" scheme, trains both for the same steps on the same data, and compares validation loss.

Tables, heatmaps and the cost profile are cached in `--output` (delete them to measure again); results go to
`fidelity.json` and `fidelity.md` there. Numbers are measurements of this machine, not targets.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"


def commonsense_rows(per_set: int, eval_per_set: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and validation rows from the BoolQ and ARC-Easy train splits (validation rows are held out)."""
    from pock_hf.data import load_instruction_rows

    train, evaluation = [], []
    for name in ("boolq", "arc_easy"):
        rows = load_instruction_rows(SHARED / name / "train.json")
        train += rows[:per_set]
        evaluation += rows[per_set : per_set + eval_per_set]
    random.Random(seed).shuffle(train)
    return train, evaluation


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=float)
        for value in set(values):  # ties share their mean rank
            where = np.array(values) == value
            ranked[where] = ranked[where].mean()
        return ranked

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def cached_table(path: Path, measure):
    from pock_hf.table import SensitivityTable

    if path.exists():
        return SensitivityTable.from_json(path)
    started = time.perf_counter()
    table = measure()
    table.settings["seconds"] = time.perf_counter() - started
    table.to_json(path)
    table.plot_heatmap(path.with_suffix(".png"), title=f"{table.settings['method']} sensitivity, SmolLM2-135M")
    return table


def train_and_validate(model, tokenizer, config, train, evaluation, args) -> float:
    """Validation loss after `args.compare_steps` AdamW steps of the Pock adapter `config` (model is unloaded after)."""
    from pock_hf.data import InstructionCollator
    from pock_hf.sensitivity import fixed_batches, trial_loss

    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id)
    train_batches = fixed_batches(train, collate, args.batch_size, args.compare_steps, args.seed)
    eval_batches = [collate(evaluation[i : i + args.batch_size]) for i in range(0, len(evaluation), args.batch_size)]
    return trial_loss(model, config, train_batches, eval_batches, args.lr, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--per-set", type=int, default=240, help="training rows from each of BoolQ and ARC-Easy")
    parser.add_argument("--eval-per-set", type=int, default=24, help="held-out validation rows from each")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=8, help="steps per unit (measured) / backward passes (proxy)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--last-k", type=int, default=4, help="the hand-made baseline updates the last k layers")
    parser.add_argument("--compare-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pock_hf import PockConfig
    from pock_hf.costs import CostProfile, profile_costs
    from pock_hf.data import tokenize_rows
    from pock_hf.default_model import load_model_and_tokenizer
    from pock_hf.sensitivity import measure_sensitivity

    args.output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer()
    train_rows, eval_rows = commonsense_rows(args.per_set, args.eval_per_set, args.seed)
    train, _ = tokenize_rows(train_rows, tokenizer, max_length=args.max_length)
    evaluation, _ = tokenize_rows(eval_rows, tokenizer, max_length=args.max_length)
    common = {
        "ratios": (args.ratio,),
        "granularity": "layer",
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    tables = {
        method: cached_table(
            args.output / f"{method}.json",
            lambda method=method: measure_sensitivity(model, tokenizer, train, evaluation, method=method, **common),
        )
        for method in ("measured", "proxy")
    }
    measured = {row.layer: row.gain for row in tables["measured"].rows}
    proxy = {row.layer: row.gain for row in tables["proxy"].rows}
    layers = sorted(measured)
    rho = spearman([measured[i] for i in layers], [proxy[i] for i in layers])

    costs_path = args.output / "costs.json"
    if costs_path.exists():
        costs = CostProfile.from_json(costs_path)
    else:
        costs = profile_costs(model, batch_size=args.batch_size, seq_len=args.max_length // 2)
        costs.to_json(costs_path)

    from pock_hf.planner import make_plan

    num_layers = costs.num_layers
    last_k = list(range(num_layers - args.last_k, num_layers))
    table = tables["measured"]
    last_k_scheme = {name: args.ratio for layer in last_k for name in table.module_names(layer, "*")}
    last_k_mb = costs.base_memory_mb(last_k[0]) + sum(costs.unit_memory_mb("*", args.ratio) for _ in last_k)
    # The planner rounds unit costs up on a 1 MB grid (so a plan always fits); 1% of slack keeps the hand-made scheme,
    # which fills its own budget exactly, within the planner's reach.
    budget_mb = last_k_mb * 1.01
    plan = make_plan(table, costs, budget_mb=budget_mb)
    last_k_gain = sum(measured[layer] for layer in last_k)
    losses = {
        "planned": train_and_validate(model, tokenizer, PockConfig(scheme=plan.scheme), train, evaluation, args),
        "last_k": train_and_validate(model, tokenizer, PockConfig(scheme=last_k_scheme), train, evaluation, args),
    }
    result = {
        "measured_seconds": tables["measured"].settings["seconds"],
        "proxy_seconds": tables["proxy"].settings["seconds"],
        "units": len(layers),
        "spearman_measured_vs_proxy": rho,
        "baseline_loss": tables["measured"].baseline,
        "budget_mb": budget_mb,
        "planned": {
            "layers": sorted({u[0] for u in plan.units}),
            "predicted_gain": plan.predicted_gain,
            "predicted_memory_mb": plan.predicted_memory_mb,
            "predicted_step_s": plan.predicted_step_s,
            "validation_loss": losses["planned"],
        },
        "last_k": {
            "layers": last_k,
            "predicted_gain": last_k_gain,
            "predicted_memory_mb": last_k_mb,
            "validation_loss": losses["last_k"],
        },
        "compare_steps": args.compare_steps,
    }
    (args.output / "fidelity.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Measured mode: {len(layers)} layer units x 1 ratio ({args.ratio}), {args.steps} steps each: "
        f"{result['measured_seconds']:.0f} s. Proxy mode: {result['proxy_seconds']:.0f} s. "
        f"Spearman rank correlation proxy vs measured: {rho:.2f}.",
        "",
        f"| scheme (budget {budget_mb:.0f} MB) | layers | predicted memory (MB) | predicted gain | validation loss "
        f"after {args.compare_steps} steps (frozen: {result['baseline_loss']:.4f}) |",
        "|---|---|---|---|---|",
        f"| planned from the measured table | {result['planned']['layers']} | {plan.predicted_memory_mb:.0f} | "
        f"{plan.predicted_gain:.4f} | {losses['planned']:.4f} |",
        f"| last {args.last_k} layers by hand | {last_k} | {last_k_mb:.0f} | {last_k_gain:.4f} | "
        f"{losses['last_k']:.4f} |",
    ]
    (args.output / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
