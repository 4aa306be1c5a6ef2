"""Does the sensitivity model predict what training does? Two checks per data set, on SmolLM2-135M-Instruct.

    python benchmarks/sensitivity_fidelity.py --output runs/fidelity              # ~1 h on a 2-core CPU
    python benchmarks/sensitivity_fidelity.py --sets personal:tomasz --output runs/fidelity_tomasz

1. The proxy against measured mode. A layer-granularity table is measured for real (every layer alone, `--steps`
   AdamW steps, validation loss) and estimated by the proxy for AdamW (steps x lr x sum |g|) and for SGD
   (steps x lr x sum g^2, the estimate the planner used before); Spearman rank correlation of each against measured.
2. The gain model against trained schemes. A module-granularity proxy table with replay damage, this device's cost
   profile, and `--calibration` measured schemes under the ceiling (the memory of updating the last
   `--ceiling-layers` layers whole at the smallest ratio; what `pock sensitivity`/the recipe do); then `--schemes`
   plans at budgets spread geometrically from the smallest feasible one to the ceiling, each trained for the same
   steps on the same data (Alpaca at `--alpaca-lr`: at 1e-3 every scheme larger than one unit raised its validation
   loss in 8 steps, measured). Spearman of the predicted gain (saturation curve) and of the additive score
   against the measured gain, and how many measured gains fall inside the predicted 95% interval.

Data sets (`--sets`): `personal[:profile]` (the generated personalisation data; validation = the held-out phrasings),
`alpaca` (rows of `--data-dir`/instruct/alpaca_5000.json; validation = later rows). Replay data: the base model's
replies to everyday probe prompts. Tables and profiles are cached per set in `--output` (delete to measure again);
results go to `fidelity.json`, `fidelity.md` and `fidelity.png`. Numbers are measurements of this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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


def data_set(name: str, args, model, tokenizer) -> tuple[list[dict], list[dict], list[dict]]:
    """(training, validation, replay) rows of a named set."""
    from pock_hf.data import load_instruction_rows, make_personal_dataset
    from pock_hf.data.personal import PROBE_PROMPTS, replay_rows
    from pock_hf.engine.generation import generate_replies

    replay = replay_rows(generate_replies(model, tokenizer, list(PROBE_PROMPTS)), PROBE_PROMPTS)
    kind, _, profile = name.partition(":")
    if kind == "personal":
        data = make_personal_dataset(seed=args.seed, profile=profile or None)
        return data.train, [{k: r[k] for k in ("instruction", "input", "output")} for r in data.heldout], replay
    if kind == "alpaca":
        rows = load_instruction_rows(args.data_dir / "instruct" / "alpaca_5000.json")
        return rows[: args.train_rows], rows[args.train_rows : args.train_rows + args.eval_rows], replay
    raise ValueError(f"unknown data set {name!r}: personal[:profile] or alpaca")


def cached(path: Path, make, load):
    if path.exists():
        return load(path)
    started = time.perf_counter()
    value = make()
    if hasattr(value, "settings"):
        value.settings["seconds"] = time.perf_counter() - started
    value.to_json(path)
    return value


def proxy_fidelity(name: str, rows, args, model, tokenizer, folder: Path) -> dict:
    """Spearman of the AdamW and SGD proxies against measured mode, layer units at one ratio."""
    from pock_hf.planning.sensitivity import measure_sensitivity
    from pock_hf.planning.table import SensitivityTable

    train, evaluation, _ = rows
    common = {"ratios": (args.ratio,), "granularity": "layer", "steps": args.steps, "lr": args.lr,
              "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed}  # fmt: skip
    tables = {}
    for label, method, optimizer in (("measured", "measured", "adamw"), ("adamw", "proxy", "adamw"),
                                     ("sgd", "proxy", "sgd")):  # fmt: skip
        tables[label] = cached(
            folder / f"layers_{label}.json",
            lambda method=method, optimizer=optimizer: measure_sensitivity(
                model, tokenizer, train, evaluation, method=method, proxy_optimizer=optimizer, **common
            ),
            SensitivityTable.from_json,
        )
        tables[label].plot_heatmap(folder / f"layers_{label}.png", title=f"{name}: {label}")
    measured = [row.gain for row in tables["measured"].rows]
    return {
        "units": len(measured),
        "measured_seconds": tables["measured"].settings.get("seconds"),
        "proxy_seconds": tables["adamw"].settings.get("seconds"),
        "spearman_adamw": spearman(measured, [row.gain for row in tables["adamw"].rows]),
        "spearman_sgd": spearman(measured, [row.gain for row in tables["sgd"].rows]),
    }


def gain_model_fidelity(rows, args, model, tokenizer, folder: Path, lr: float) -> dict:
    """Predicted against measured gain of plans at budgets from the smallest feasible one to the ceiling, after
    measured calibration; schemes train at `lr`."""
    from pock_hf.planning.calibration import measure_schemes
    from pock_hf.planning.costs import CostProfile, profile_costs
    from pock_hf.planning.planner import make_plan
    from pock_hf.planning.sensitivity import (
        example_losses,
        measure_sensitivity,
        paired_difference,
        prepare_measurement_data,
        scheme_channel_indices,
        train_scheme,
    )
    from pock_hf.planning.table import SensitivityTable

    train, evaluation, replay = rows
    settings = {"ratios": tuple(args.module_ratios), "steps": args.steps, "lr": args.lr,
                "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed}  # fmt: skip
    table = cached(
        folder / "modules_proxy.json",
        lambda: measure_sensitivity(
            model, tokenizer, train, evaluation, replay_data=replay, method="proxy", **settings
        ),
        SensitivityTable.from_json,
    )
    costs = cached(
        folder / "costs.json",
        lambda: profile_costs(model, batch_size=args.batch_size, seq_len=args.max_length // 2, repeats=1),
        CostProfile.from_json,
    )
    bare = dataclasses.replace(table, schemes=[])
    smallest = make_plan(bare, costs, budget_mb=1e9, spend="budget").ladder[0].memory_mb
    # the ceiling: what updating the last `--ceiling-layers` layers whole at the smallest ratio would take
    layers = min(args.ceiling_layers, costs.num_layers)
    ceiling = costs.base_memory_mb(costs.num_layers - layers) + layers * costs.unit_memory_mb(
        "*", min(args.module_ratios)
    )
    calibrated = cached(
        folder / "modules_calibrated.json",
        lambda: measure_schemes(
            model, tokenizer, table, costs, train, evaluation, replay, budget_mb=ceiling, count=args.calibration, lr=lr
        ),
        SensitivityTable.from_json,
    )
    data = prepare_measurement_data(tokenizer, train, evaluation, replay, **{
        k: settings[k] for k in ("batch_size", "steps", "max_length", "seed")})  # fmt: skip
    before, counts = example_losses(model, data.eval_batches)
    # budgets between the calibration's, so no evaluated scheme is a fitted point by construction
    budgets = np.geomspace(smallest, ceiling, args.schemes + 2)[1:-1] * (ceiling / smallest) ** (0.5 / args.schemes)
    schemes, seen = [], set()
    for budget in budgets:
        # damage weight 0: this checks the gain prediction alone
        plan = make_plan(calibrated, costs, budget_mb=float(min(budget, ceiling)), spend="budget", damage_weight=0.0)
        key = tuple(sorted(plan.units))
        if key in seen:
            continue
        seen.add(key)
        config = plan.to_config(channel_indices=scheme_channel_indices(table, plan.scheme))
        wrapped = train_scheme(model, config, data.train_batches, lr, args.seed)
        try:
            gain, se = paired_difference(before, example_losses(wrapped, data.eval_batches)[0], counts)
        finally:
            wrapped.unload()
        low, high = plan.predicted_gain_interval
        schemes.append({"budget_mb": float(budget), "memory_mb": plan.predicted_memory_mb, "units": len(plan.units),
                        "cut": plan.cut_layer, "additive": plan.additive_gain, "predicted": plan.predicted_gain,
                        "interval": [low, high], "measured": gain, "measured_se": se})  # fmt: skip
    measured = [s["measured"] for s in schemes]
    variable = [s["memory_mb"] - costs.base_memory_mb(costs.num_layers - 1) for s in schemes]
    return {
        "calibration": [dataclasses.asdict(s) for s in calibrated.schemes],
        "gain_model": dataclasses.asdict(
            make_plan(calibrated, costs, budget_mb=ceiling, damage_weight=0.0).gain_model
        ),
        "lr": lr,
        "ceiling_mb": ceiling,
        "schemes": schemes,
        "span_total": max(s["memory_mb"] for s in schemes) / min(s["memory_mb"] for s in schemes),
        "span_above_top_step": max(variable) / max(min(variable), 1e-9),
        "spearman_predicted": spearman([s["predicted"] for s in schemes], measured),
        "spearman_additive": spearman([s["additive"] for s in schemes], measured),
        "inside_interval": sum(s["interval"][0] <= s["measured"] <= s["interval"][1] for s in schemes),
    }


def plot(sets: dict, path: Path) -> None:
    """Per set: measured gain (with its 95% interval) against memory, and the predicted curve with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pock_hf.io.files import save_figure

    figure, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], sets.items()):
        schemes = result["gain_model"]["schemes"]
        memory = [s["memory_mb"] for s in schemes]
        ax.errorbar(memory, [s["measured"] for s in schemes], yerr=[1.96 * s["measured_se"] for s in schemes],
                    fmt="o", label="measured (trained)")  # fmt: skip
        ax.plot(memory, [s["predicted"] for s in schemes], "s-", label="predicted (saturation curve)")
        ax.fill_between(memory, [s["interval"][0] for s in schemes], [s["interval"][1] for s in schemes], alpha=0.15)
        calibration = result["gain_model"]["calibration"]
        ax.plot([c["memory_mb"] for c in calibration], [c["gain"] for c in calibration], "x", color="black",
                label="calibration schemes")  # fmt: skip
        ax.set(title=f"{name}: Spearman {result['gain_model']['spearman_predicted']:.2f}", xlabel="memory (MB)",
               ylabel="validation loss decrease")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(figure, path)


def _plain(value):
    """numpy scalars (a count of booleans, a rank) as the Python numbers JSON knows."""
    return value.item()


def write_report(results: dict, output: Path) -> str:
    """fidelity.json, fidelity.md and fidelity.png in `output`; returns the Markdown."""
    from pock_hf.io.files import atomic_write_text

    sets = results["sets"]
    lines = [
        "| data set | units | Spearman AdamW proxy vs measured | SGD proxy vs measured | measured / proxy time (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, result in sets.items():
        proxy = result["proxy"]
        lines.append(f"| {name} | {proxy['units']} | {proxy['spearman_adamw']:.2f} | {proxy['spearman_sgd']:.2f} | "
                     f"{proxy['measured_seconds'] or 0:.0f} / {proxy['proxy_seconds'] or 0:.0f} |")  # fmt: skip
    lines += [
        "",
        (
            "| data set | schemes | memory span (total / above the top step) | Spearman predicted vs measured | "
            "additive vs measured | measured inside the 95% interval |"
        ),
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, result in sets.items():
        model = result["gain_model"]
        lines.append(f"| {name} | {len(model['schemes'])} | {model['span_total']:.1f}x / "
                     f"{model['span_above_top_step']:.1f}x | {model['spearman_predicted']:.2f} | "
                     f"{model['spearman_additive']:.2f} | {model['inside_interval']} of {len(model['schemes'])} |")  # fmt: skip
    for name, result in sets.items():
        lines += ["", f"{name}: schemes (memory MB, units, cut, additive score, predicted [95%], measured ± SE)", ""]
        lines += ["| memory | units | cut | additive | predicted | measured |", "|---:|---:|---:|---:|---|---|"]
        for s in result["gain_model"]["schemes"]:
            lines.append(f"| {s['memory_mb']:.0f} | {s['units']} | {s['cut']} | {s['additive']:.3g} | "
                         f"{s['predicted']:.3f} [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}] | "
                         f"{s['measured']:.3f} ± {s['measured_se']:.3f} |")  # fmt: skip
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(output / "fidelity.json", json.dumps(results, indent=2, default=_plain))
    atomic_write_text(output / "fidelity.md", markdown)
    plot(sets, output / "fidelity.png")
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    parser.add_argument("--output", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--sets", nargs="+", default=["personal", "alpaca"])
    parser.add_argument("--train-rows", type=int, default=400, help="alpaca: training rows")
    parser.add_argument("--eval-rows", type=int, default=48, help="alpaca: validation rows after them")
    parser.add_argument("--ratio", type=float, default=0.25, help="ratio of the layer units (check 1)")
    parser.add_argument("--module-ratios", type=float, nargs="+", default=[0.25, 1.0], help="ratios (check 2)")
    parser.add_argument("--steps", type=int, default=8, help="training steps (measured, schemes) / proxy passes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=4, help="measured schemes the gain model is fitted on")
    parser.add_argument("--schemes", type=int, default=8, help="plans to train and compare")
    parser.add_argument(
        "--ceiling-layers", type=int, default=12, help="ceiling: the last N layers whole, smallest ratio"
    )
    parser.add_argument("--alpaca-lr", type=float, default=2e-4, help="learning rate of the alpaca schemes (check 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="redraw the tables and plot from fidelity.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from pock_hf.data.default_model import load_model_and_tokenizer

    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((args.output / "fidelity.json").read_text())
        print(write_report(results, args.output))
        return results
    model, tokenizer = load_model_and_tokenizer(args.model)
    results = {}
    for name in args.sets:
        folder = args.output / name.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        rows = data_set(name, args, model, tokenizer)
        lr = args.alpaca_lr if name.startswith("alpaca") else args.lr
        results[name] = {
            "proxy": proxy_fidelity(name, rows, args, model, tokenizer, folder),
            "gain_model": gain_model_fidelity(rows, args, model, tokenizer, folder, lr),
        }
        report = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "sets": results,
        }
        print(write_report(report, args.output))  # after every set: a later set's failure loses nothing
    return report


if __name__ == "__main__":
    main()
