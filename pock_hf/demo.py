"""The main job's task: what on-device personalisation measures, and how it is shown.

The main job itself is the recipe with the demo config (what `make demo` runs):

    python recipes/finetune.py --config recipes/configs/demo_cpu.yaml

It trains on the generated profile of `pock_hf.data.personal` and calls this module to ask the model questions
(greedy, through the chat template), score held-out fact recall and general-answer retention, draw the loss curve
and print the before/after table.
"""

from __future__ import annotations

from pathlib import Path

from .data.personal import PersonalDataset, fact_recall
from .engine.generation import generate_replies


def evaluate_personal(model, tokenizer, data: PersonalDataset) -> dict:
    """Held-out fact recall and general-answer retention (ratios in [0, 1]) with the replies behind them."""
    heldout = generate_replies(model, tokenizer, [r["instruction"] for r in data.heldout])
    general = generate_replies(model, tokenizer, [r["instruction"] for r in data.general])
    return {
        "fact_recall": fact_recall(heldout, data.heldout),
        "general_retention": fact_recall(general, data.general),
        "heldout_replies": heldout,
        "general_replies": general,
    }


def plot_losses(losses: list[float], path: Path, title: str) -> Path:
    """A PNG of the training loss (nats per labelled token) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses)
    axes.set(xlabel="step", ylabel="training loss (labelled tokens)", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


MEASURES = {
    "fact_recall": "held-out fact recall",
    "general_retention": "general-answer retention",
    "heldout_loss": "held-out loss (nats/token)",
}


def summary_table(before: dict, after: dict, method: str) -> str:
    """A Markdown table of every measure present in both `before` and `after`."""
    lines = [f"| measure | base model | + {method} |", "|---|---|---|"]
    for key, label in MEASURES.items():
        if key in before and key in after:
            show = (lambda v: f"{v:.3f}") if key == "heldout_loss" else (lambda v: f"{v:.1%}")
            lines.append(f"| {label} | {show(before[key])} | {show(after[key])} |")
    return "\n".join(lines)
