"""Sensitivity fidelity on SmolLM2-135M-Instruct with the BoolQ + ARC-Easy train splits.

    python benchmarks/sensitivity_fidelity.py --output runs/fidelity          # ~35 min on a 2-core CPU

1. Measures a layer-granularity table in measured mode (fine-tune each layer at one ratio, validation loss) and in
   proxy mode (first-order, a few backward passes), timing both, and reports their Spearman rank correlation.
2. Profiles this device's costs and, for each depth k in `--depths`, plans a scheme from the measured table at the
   predicted memory of the hand-made "last k layers" scheme. Every distinct scheme is trained for the same steps on
   the same data; its measured gain (frozen validation loss minus the loss after training) is set against the
   planner's predicted gain (the sum of its units' table gains): their Spearman correlation says whether the additive
   model ranks schemes the way training does. Where a plan differs from the last k layers, those are trained too.

Tables, heatmaps and the cost profile are cached in `--output` (delete them to measure again); results go to
`fidelity.json`, `fidelity.md` and `fidelity.png` (predicted against measured gain) there. Numbers are measurements
of this machine, not targets.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def commonsense_rows(data_dir: Path, per_set: int, eval_per_set: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and validation rows from the BoolQ and ARC-Easy train splits (validation rows are held out)."""
    from pock_hf.data import load_instruction_rows

    train, evaluation = [], []
    for name in ("boolq", "arc_easy"):
        rows = load_instruction_rows(data_dir / "commonsense" / name / "train.json")
        train += rows[:per_set]
        evaluation += rows[per_set : per_set + eval_per_set]
    random.Random(seed).shuffle(train)
    return train, evaluation


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant or has < 2 values."""

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=float)
        for value in set(values):  # ties share their mean rank
            where = np.array(values) == value
            ranked[where] = ranked[where].mean()
        return ranked

    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def cached_table(path: Path, measure):
    from pock_hf.planning.table import SensitivityTable

    if path.exists():
        return SensitivityTable.from_json(path)
    started = time.perf_counter()
    table = measure()
    table.settings["seconds"] = time.perf_counter() - started
    table.to_json(path)
    table.plot_heatmap(path.with_suffix(".png"), title=f"{table.settings['method']} sensitivity")
    return table


def layer_span(layers: list[int]) -> str:
    """`"22-29"` for a contiguous run of layers, else the list."""
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def distinct_schemes(rows: list[dict]) -> list[dict]:
    """One row per distinct scheme (a plan can equal its last-k scheme, or another budget's plan)."""
    return list({tuple(row["layers"]): row for row in rows}.values())


def plot(rows: list[dict], baseline: float, path: Path) -> None:
    """Measured against predicted gain, on an axis from zero to the largest possible gain (the frozen loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pock_hf.io.files import save_figure

    figure, axes = plt.subplots(figsize=(6, 4))
    for row in rows:
        point = (row["predicted_gain"], row["measured_gain"])
        axes.scatter(*point, color="tab:green" if row["planned"] else "tab:grey")
        axes.annotate(layer_span(row["layers"]), point, fontsize=7, xytext=(-8, -12), textcoords="offset points")
    axes.axhline(baseline, color="tab:red", linestyle="--", linewidth=1, label="frozen loss (largest possible gain)")
    axes.set_ylim(0, baseline * 1.1)
    axes.legend(loc="lower right", fontsize=8)
    axes.set(xlabel="predicted gain (sum of table gains); labels: updated layers",
             ylabel="measured gain (validation loss drop)",
             title="Planned schemes: predicted vs measured gain")  # fmt: skip
    axes.grid(alpha=0.3)
    save_figure(figure, path)


def write_report(result: dict, output: Path) -> str:
    """fidelity.json, fidelity.md and fidelity.png in `output`; returns the Markdown."""
    from pock_hf.io.files import atomic_write_text

    settings, rows = result["settings"], result["schemes"]
    lines = [
        f"Measured mode: {result['units']} layer units x 1 ratio ({settings['ratio']}), {settings['steps']} steps "
        f"each: {result['measured_seconds']:.0f} s. Proxy mode: {result['proxy_seconds']:.0f} s. Spearman rank "
        f"correlation proxy vs measured: {result['spearman_measured_vs_proxy']:.2f}. Predicted vs measured gain over "
        f"the {len(distinct_schemes(rows))} distinct schemes below: "
        f"{result['spearman_predicted_vs_measured_gain']:.2f}.",
        "",
        f"| budget (MB) | scheme | layers | predicted memory (MB) | predicted gain | measured gain after "
        f"{settings['compare_steps']} steps (frozen loss {result['baseline_loss']:.4f}) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        kind = "planned" if row["planned"] else f"last {row['k']} by hand"
        cells = [f"{row['budget_mb']:.0f}", kind, layer_span(row["layers"]), f"{row['predicted_memory_mb']:.0f}",
                 f"{row['predicted_gain']:.3f}", f"{row['measured_gain']:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if all(row["planned"] for row in rows):
        lines += ["", "Every plan is the last k layers at its budget."]
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(output / "fidelity.json", json.dumps(result, indent=2))
    atomic_write_text(output / "fidelity.md", markdown)
    plot(rows, result["baseline_loss"], output / "fidelity.png")
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    parser.add_argument("--output", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--per-set", type=int, default=240, help="training rows from each of BoolQ and ARC-Easy")
    parser.add_argument("--eval-per-set", type=int, default=24, help="held-out validation rows from each")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=8, help="steps per unit (measured) / backward passes (proxy)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12, 18],
                        help="one memory budget per depth k: that of updating the last k layers")  # fmt: skip
    parser.add_argument("--compare-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="redraw the table and plot from fidelity.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from pock_hf import PockConfig
    from pock_hf.data import InstructionCollator, tokenize_rows
    from pock_hf.data.default_model import load_model_and_tokenizer
    from pock_hf.planning.costs import CostProfile, profile_costs
    from pock_hf.planning.planner import make_plan
    from pock_hf.planning.sensitivity import evaluate_loss, fixed_batches, measure_sensitivity, train_scheme

    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        result = json.loads((args.output / "fidelity.json").read_text())
        print(write_report(result, args.output))
        return result
    model, tokenizer = load_model_and_tokenizer(args.model)
    train_rows, eval_rows = commonsense_rows(args.data_dir, args.per_set, args.eval_per_set, args.seed)
    train, _ = tokenize_rows(train_rows, tokenizer, max_length=args.max_length)
    evaluation, _ = tokenize_rows(eval_rows, tokenizer, max_length=args.max_length)
    common = {"ratios": (args.ratio,), "granularity": "layer", "steps": args.steps, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed}  # fmt: skip
    tables = {
        method: cached_table(
            args.output / f"{method}.json",
            lambda method=method: measure_sensitivity(model, tokenizer, train, evaluation, method=method, **common),
        )
        for method in ("measured", "proxy")
    }
    table = tables["measured"]
    measured = {row.layer: row.gain for row in table.rows}
    proxy = {row.layer: row.gain for row in tables["proxy"].rows}
    layers = sorted(measured)
    rho_tables = spearman([measured[i] for i in layers], [proxy[i] for i in layers])

    costs_path = args.output / "costs.json"
    if costs_path.exists():
        costs = CostProfile.from_json(costs_path)
    else:
        costs = profile_costs(model, batch_size=args.batch_size, seq_len=args.max_length // 2)
        costs.to_json(costs_path)

    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id)
    train_batches = fixed_batches(train, collate, args.batch_size, args.compare_steps, args.seed)
    eval_batches = [collate(evaluation[i : i + args.batch_size]) for i in range(0, len(evaluation), args.batch_size)]
    trained: dict[tuple, float] = {}  # scheme (sorted items) -> validation loss, so no scheme trains twice

    def measured_gain(scheme: dict) -> float:
        key = tuple(sorted(scheme.items()))
        if key not in trained:
            wrapped = train_scheme(model, PockConfig(scheme=scheme), train_batches, args.lr, args.seed)
            trained[key] = evaluate_loss(wrapped, eval_batches)
            wrapped.unload()
        return table.baseline - trained[key]

    rows = []
    for k in sorted({min(k, costs.num_layers) for k in args.depths}):
        last_k = list(range(costs.num_layers - k, costs.num_layers))
        last_k_scheme = {name: args.ratio for layer in last_k for name in table.module_names(layer, "*")}
        last_k_mb = costs.base_memory_mb(last_k[0]) + k * costs.unit_memory_mb("*", args.ratio)
        # The planner rounds unit costs up on a 1 MB grid (so a plan always fits); 1% of slack keeps the hand-made
        # scheme, which fills its own budget exactly, within the planner's reach.
        plan = make_plan(table, costs, budget_mb=last_k_mb * 1.01, spend="budget")
        plan_layers = sorted({unit[0] for unit in plan.units})
        candidates = [(True, plan.scheme, plan_layers, plan.predicted_gain, plan.predicted_memory_mb)]
        if plan.scheme != last_k_scheme:
            candidates.append((False, last_k_scheme, last_k, sum(measured[layer] for layer in last_k), last_k_mb))
        for planned, scheme, scheme_layers, predicted, memory in candidates:
            rows.append({"budget_mb": last_k_mb * 1.01, "k": k, "planned": planned, "layers": scheme_layers,
                         "predicted_memory_mb": memory, "predicted_gain": predicted,
                         "measured_gain": measured_gain(scheme)})  # fmt: skip
    distinct = distinct_schemes(rows)
    result = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "measured_seconds": table.settings["seconds"],
        "proxy_seconds": tables["proxy"].settings["seconds"],
        "units": len(layers),
        "baseline_loss": table.baseline,
        "spearman_measured_vs_proxy": rho_tables,
        "spearman_predicted_vs_measured_gain": spearman(
            [row["predicted_gain"] for row in distinct], [row["measured_gain"] for row in distinct]
        ),
        "schemes": rows,
    }
    print(write_report(result, args.output))
    return result


if __name__ == "__main__":
    main()
