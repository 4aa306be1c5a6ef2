"""Reports of an evaluation summary: a Markdown table and a bar chart comparing the systems."""

from __future__ import annotations

import math
from pathlib import Path

from pock_hf.io.files import atomic_write_text, save_figure


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def write_markdown(summary: dict, path: Path) -> Path:
    """`markdown(summary)` written to `path`."""
    return atomic_write_text(path, markdown(summary))


def markdown(summary: dict) -> str:
    """Tables: each task's metrics per system, a row each, the headline first (%, with the 95% CI and seconds), the
    majority-class rate, then the differences from the baseline and the pairwise win rates."""
    systems = [system["label"] for system in summary["systems"]]
    lines = [
        "| task | n | metric | majority | " + " | ".join(systems) + " |",
        "|---|---|---|---|" + "---|" * len(systems),
    ]
    for name, info in summary["tasks"].items():
        for metric in info["metrics"]:  # every metric, the headline first
            cells = []
            for label in systems:
                result = summary["results"][label][name]
                value = result["metrics"][metric]
                missing = f", {result['missing']} missing" if result["missing"] else ""
                cells.append(
                    f"{_percent(value['value'])} [{_percent(value['ci_low'])}, {_percent(value['ci_high'])}] "
                    f"({result['seconds']:.0f} s{missing})"
                )
            majority = _percent(info["majority_rate"])
            lines.append(f"| {name} | {info['n']} | {metric} | {majority} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Values in %, 95% bootstrap CI in brackets, then the seconds the system took on the task.")
    if summary["comparisons"]:
        lines += [
            "",
            "| task | metric | system - baseline (points) | 95% CI | beyond noise |",
            "|---|---|---|---|---|",
        ]
        for row in summary["comparisons"]:
            lines.append(
                f"| {row['task']} | {row['metric']} | {100 * row['difference']:+.1f} | "
                f"[{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}] | {'yes' if row['significant'] else 'no'} |"
            )
    if summary["pairwise"]:
        lines += ["", "| task | system vs baseline | judge | win rate | 95% CI | W / L / T | missing |"]
        lines.append("|---|---|---|---|---|---|---|")
        for row in summary["pairwise"]:
            lines.append(
                f"| {row['task']} | {row['system']} vs {row['baseline']} | {row['judge']} | {_percent(row['win_rate'])} | "
                f"[{_percent(row['ci_low'])}, {_percent(row['ci_high'])}] | {row['wins']} / {row['losses']} / "
                f"{row['ties']} | {row['missing']} |"
            )
    return "\n".join(lines) + "\n"


def plot_comparison(summary: dict, path: Path) -> Path:
    """Grouped bars: each task's headline metric per system with 95% CI whiskers; a dash marks the majority rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [system["label"] for system in summary["systems"]]
    tasks = list(summary["tasks"])
    width = 0.8 / len(systems)
    figure, axes = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(systems) / 2) + 1.5), 3.8))
    for offset, label in enumerate(systems):
        xs, values, errors = [], [], [[], []]
        for index, name in enumerate(tasks):
            metric = summary["tasks"][name]["metrics"][0]
            value = summary["results"][label][name]["metrics"][metric]
            if math.isnan(value["value"]):
                continue
            xs.append(index - 0.4 + width * (offset + 0.5))
            values.append(100 * value["value"])
            errors[0].append(100 * (value["value"] - value["ci_low"]))
            errors[1].append(100 * (value["ci_high"] - value["value"]))
        axes.bar(xs, values, width, yerr=errors, capsize=3, label=label)
    for index, name in enumerate(tasks):
        rate = summary["tasks"][name]["majority_rate"]
        if rate is not None:
            axes.hlines(100 * rate, index - 0.45, index + 0.45, colors="black", linestyles="dashed", linewidth=1)
    axes.set_xticks(range(len(tasks)), [f"{name}\n({summary['tasks'][name]['metrics'][0]})" for name in tasks])
    axes.set(ylabel="score (%)", ylim=(0, 100), title="pock-eval: systems compared (dashes: majority class)")
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return save_figure(figure, path)
