"""Does the planner earn its keep? Personalisation on several profiles and seeds, every system at its measured peak.

    python benchmarks/personalization.py --output runs/personalization                   # hours on a 2-core CPU
    python benchmarks/personalization.py --profiles marisol --seeds 0 --systems hand planned additive

Each system is one run of the recipe (`recipes/finetune.py` with `recipes/configs/demo_cpu.yaml` and overrides) in a
process of its own, so its peak memory is the process's own (measured, not predicted). Per profile and seed:

- `hand`: the MLPs of layers 18-29 at 25% of their channels (hand-picked). Its measured peak is the memory ceiling
  the planners get (plus `--headroom-mb`; at its default 0 every planned scheme is compared at equal or lower peak
  memory).
- `planned`: the planner as shipped (AdamW proxy with replay damage; the table's best schemes at three depths, all
  blocks or MLPs only, trained for real with checkpointing above the cut; the cheapest within noise of the best
  measured gain - damage), ceiling = `hand`'s peak.
- `curve`: the planner of the previous release (budget-spanning measured schemes, saturation curve, no
  checkpointing).
- `additive`: the planner before that (SGD proxy, additive gains, no damage, spends the whole ceiling).
- `last6`: layers 24-29, every linear at 25%.
- `random`: `--random` schemes drawn at random from the planned run's table, each filling the planned scheme's
  predicted memory (mean reported).
- `lora`: PEFT LoRA r=8 on every linear; `full`: full fine-tuning for the same steps; `full_time`: full fine-tuning
  for the planned run's training time.

Reported per system: held-out fact recall, general-answer retention, held-out loss and measured peak memory, as the
mean over profiles x seeds with a 95% t-interval, plus per-run values in `personalization.json`; a chart in
`personalization.png`. Finished runs are kept in `--output` and not run again (delete a run's folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune.py"
CONFIG = ROOT / "recipes" / "configs" / "demo_cpu.yaml"
SYSTEMS = ("hand", "planned", "curve", "additive", "last6", "random", "lora", "full", "full_time")
METRICS = ("fact_recall", "general_retention", "heldout_loss", "peak_memory_mb")
STATIC = "pock.measure=null"  # a scheme given by layers or file: no measurement


def overrides(system: str, ceiling_mb: float | None, num_layers: int = 30) -> list[str]:
    """Recipe overrides of one system (the ceiling only for the planners). The hand-made schemes scale with the
    model's depth: the MLPs of the upper 40% of the layers (18-29 of 30) and every linear of the top 20% (24-29)."""
    upper = f"{round(0.6 * num_layers)}-{num_layers - 1}"
    last = f"{num_layers - max(1, round(0.2 * num_layers))}-{num_layers - 1}"
    layers = {
        "hand": [f"pock.layers={upper}", "pock.modules=[mlp.gate_proj,mlp.up_proj,mlp.down_proj]"],
        "last6": [f"pock.layers={last}"],
    }
    if system in layers:
        return [STATIC, *layers[system], "pock.ratio=0.25", "budget.memory_mb=null"]
    if system == "planned":
        return [f"budget.memory_mb={ceiling_mb:.1f}"]
    previous = ["pock.measure_depths=null", "pock.gradient_checkpointing=false"]
    if system == "curve":
        return [f"budget.memory_mb={ceiling_mb:.1f}", *previous, "pock.measure_schemes=4"]
    if system == "additive":
        return [f"budget.memory_mb={ceiling_mb:.1f}", *previous, "pock.proxy_optimizer=sgd", "pock.measure_schemes=0",
                "pock.spend=budget", "pock.damage_weight=0", "pock.measure_replay=false"]  # fmt: skip
    if system in ("lora", "full", "full_time"):
        return [f"method={'lora' if system == 'lora' else 'full'}", "pock.measure=null", "budget.memory_mb=null",
                "train.prefix_cache_mb=0"]  # fmt: skip
    raise ValueError(system)


def run(folder: Path, args_: list[str], timeout: float) -> dict:
    """The recipe's report for these overrides, running it unless `folder` already holds one. A run that fails (a
    plan that cannot fit the ceiling, say) gives `{"failed": <its last error line>}`, kept in `failed.txt`."""
    report, failed = folder / "report.json", folder / "failed.txt"
    if not report.exists() and not failed.exists():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(RECIPE), "--config", str(CONFIG), f"output.dir={folder}", *args_]
        with open(folder / "log.txt", "w") as log:
            try:
                code = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
        if code is None:
            failed.write_text(f"timed out after {timeout:.0f} s (--timeout)\n")
        elif code != 0:
            lines = (folder / "log.txt").read_text().strip().splitlines() or ["(no output)"]
            failed.write_text(lines[-1] + "\n")
    if failed.exists():
        return {"failed": failed.read_text().strip()}
    return json.loads(report.read_text())


def random_scheme(planned: Path, rng: random.Random) -> dict[str, float]:
    """Units drawn at random (any layer, module and measured ratio) while the scheme's predicted memory stays within
    the planned scheme's, from the planned run's own table and cost profile."""
    from pock_hf.planning.costs import CostProfile
    from pock_hf.planning.planner import Plan
    from pock_hf.planning.table import SensitivityTable

    table = SensitivityTable.from_json(planned / "sensitivity.json")
    costs = CostProfile.from_json(planned / "costs.json")
    limit = Plan.from_json(planned / "scheme.json").predicted_memory_mb
    units = sorted({(row.layer, row.module) for row in table.rows})
    ratios = sorted({row.ratio for row in table.rows})
    rng.shuffle(units)
    chosen: list[tuple[int, str, float]] = []
    for layer, module in units:
        candidate = [*chosen, (layer, module, rng.choice(ratios))]
        if costs.scheme_cost(candidate)[0] <= limit:
            chosen = candidate
    return {name: ratio for layer, module, ratio in chosen for name in table.module_names(layer, module)}


def profile_seed(profile: str, seed: int, args) -> dict[str, list[dict]]:
    """Every system's report(s) for one profile and seed."""
    base = args.output / f"{profile}_seed{seed}"
    common = [f"data.train=personal:{profile}", f"train.seed={seed}", f"train.steps={args.steps}", *args.set]
    if args.model:
        common.append(f"model.name={args.model}")

    def system_overrides(system: str, ceiling: float | None = None) -> list[str]:
        return overrides(system, ceiling, args.layers)

    reports = {"hand": [run(base / "hand", [*common, *system_overrides("hand")], args.timeout)]}
    if "failed" in reports["hand"][0]:
        print(
            f"{profile} seed {seed}: the hand-picked run failed ({reports['hand'][0]['failed']}), so there is no "
            f"ceiling to plan under; skipped the other systems. Its log: {base / 'hand' / 'log.txt'}"
        )
        return reports
    ceiling = reports["hand"][0]["peak_memory_mb"] + args.headroom_mb
    for system in args.systems:
        if system in ("hand", "random", "full_time"):
            continue
        reports[system] = [run(base / system, [*common, *system_overrides(system, ceiling)], args.timeout)]
    if "random" in args.systems and "failed" not in reports.get("planned", [{"failed": ""}])[0]:
        rng = random.Random(1000 * seed + sum(map(ord, profile)))
        reports["random"] = []
        for index in range(args.random):
            folder = base / f"random{index}"
            scheme = folder / "scheme_in.json"
            if not scheme.exists():
                folder.mkdir(parents=True, exist_ok=True)
                scheme.write_text(json.dumps(random_scheme(base / "planned", rng)))
            reports["random"].append(run(folder, [*common, STATIC, f"pock.scheme={scheme}"], args.timeout))
    if "full_time" in args.systems:
        full = reports.setdefault("full", [run(base / "full", [*common, *system_overrides("full")], args.timeout)])
        planned = reports.get("planned", [{"failed": "not run"}])[0]
        if "failed" in planned or "failed" in full[0]:
            return reports  # equal time needs both the planned run's time and a full step's
        steps = max(1, round(planned["train_seconds"] / full[0]["seconds_per_step"]))
        common_time = [c for c in common if not c.startswith("train.steps")] + [f"train.steps={steps}"]
        reports["full_time"] = [run(base / "full_time", [*common_time, *system_overrides("full_time")], args.timeout)]
    return reports


def values(report: dict) -> dict:
    if "failed" in report:
        return {"failed": report["failed"]}
    after = report["after"]
    return {
        "fact_recall": after.get("fact_recall"),
        "general_retention": after.get("general_retention"),
        "heldout_loss": after.get("heldout_loss"),
        "peak_memory_mb": report.get("peak_memory_mb"),
        "train_seconds": report.get("train_seconds"),
        "steps": report.get("steps"),
        "units": report.get("plan", {}).get("units"),
    }


def mean_interval(samples: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one sample)."""
    t95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    n = len(samples)
    mean = sum(samples) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((x - mean) ** 2 for x in samples) / (n - 1))
    return mean, t95.get(n - 1, 2.0) * sd / math.sqrt(n)


def summarize(runs: dict) -> dict:
    """Per system and metric: mean over profile x seed (random: its mean per pair first) with a 95% interval."""
    summary = {}
    systems = [s for s in SYSTEMS if any(s in pair for pair in runs.values())]
    for system in systems:
        per_pair = [[v for v in pair[system] if "failed" not in v] for pair in runs.values() if system in pair]
        failed = sum(len(pair[system]) for pair in runs.values() if system in pair) - sum(map(len, per_pair))
        per_pair = [reports for reports in per_pair if reports]
        if not per_pair:
            summary[system] = {"pairs": 0, "failed": failed}
            continue
        summary[system] = {"failed": failed, "pairs": len(per_pair)}
        for metric in METRICS:
            samples = [sum(v[metric] for v in reports) / len(reports) for reports in per_pair]
            summary[system][metric] = mean_interval(samples)
    return summary


def percent_cell(value: tuple[float, float]) -> str:
    return f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}%"


def write_report(result: dict, output: Path) -> str:
    from pock_hf.io.files import atomic_write_text

    lines = [
        "| system | runs | held-out fact recall | general retention | held-out loss | measured peak (MB) |",
        "|---|---:|---|---|---|---|",
    ]
    for system, metrics in result["summary"].items():
        if not metrics["pairs"]:
            lines.append(f"| {system} | 0 ({metrics['failed']} failed) | | | | |")
            continue
        recall, retention = (percent_cell(metrics[m]) for m in ("fact_recall", "general_retention"))
        loss, memory = metrics["heldout_loss"], metrics["peak_memory_mb"]
        runs = f"{metrics['pairs']}" + (f" ({metrics['failed']} failed)" if metrics["failed"] else "")
        lines.append(f"| {system} | {runs} | {recall} | {retention} | {loss[0]:.3f} ± {loss[1]:.3f} | "
                     f"{memory[0]:.0f} ± {memory[1]:.0f} |")  # fmt: skip
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(output / "personalization.json", json.dumps(result, indent=1))
    atomic_write_text(output / "personalization.md", markdown)
    plot(result["summary"], output / "personalization.png")
    return markdown


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pock_hf.io.files import save_figure

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    systems = [system for system, metrics in summary.items() if metrics["pairs"]]
    for ax, (metric, label) in zip(axes, [("fact_recall", "held-out fact recall"),
                                          ("general_retention", "general retention"),
                                          ("peak_memory_mb", "measured peak memory (MB)")]):  # fmt: skip
        means = [summary[s][metric][0] for s in systems]
        halves = [summary[s][metric][1] for s in systems]
        ax.bar(systems, means, yerr=halves, color=["C3" if s == "planned" else "C0" for s in systems])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_figure(figure, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/personalization"))
    parser.add_argument("--model", help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", type=int, default=30, help="the model's decoder layers (the hand-made schemes)")
    parser.add_argument("--set", nargs="*", default=[], help="more recipe overrides, key=value")
    parser.add_argument("--profiles", nargs="+", default=["marisol", "tomasz", "aiko"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--random", type=int, default=5, help="random schemes per profile and seed")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--headroom-mb",
        type=float,
        default=0.0,
        help="MB added to the hand-picked run's measured peak to make the planners' ceiling (default 0: equal peak)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per recipe run")
    parser.add_argument("--report-only", action="store_true", help="redraw from personalization.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        result = json.loads((args.output / "personalization.json").read_text())
        print(write_report(result, args.output))
        return result
    runs = {}
    for profile in args.profiles:
        for seed in args.seeds:
            reports = profile_seed(profile, seed, args)
            runs[f"{profile}/{seed}"] = {system: [values(r) for r in rs] for system, rs in reports.items()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"settings": settings, "runs": runs, "summary": summarize(runs)}
    print(write_report(result, args.output))
    return result


if __name__ == "__main__":
    main()
