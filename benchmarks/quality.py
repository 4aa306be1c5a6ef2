"""Quality at equal tokens and at equal wall-clock time: full fine-tuning, PEFT LoRA and Pock at several budgets,
trained on the same commonsense data and evaluated with the pock_eval harness.

    python benchmarks/quality.py --output runs/quality                   # 77 min on a 2-core CPU (measured)
    python benchmarks/quality.py --limit 300 --output runs/quality       # ~60 min: 300 test rows per task
    python benchmarks/quality.py --steps 40 --limit 100 --output runs/q  # a quicker, noisier look
    python benchmarks/quality.py --output runs/quality --report-only     # redraw table and plot from quality.json

   (77 min = sensitivity 9 + cost profile 3 + training 27 + evaluating 8 systems 38.)

1. Data: the BoolQ, ARC-Easy and OpenBookQA train splits (`--data-dir`), mixed and shuffled with `--seed`;
   `--validation-rows` of them are held out for the sensitivity measurement and the validation loss.
2. Plan: a *measured* sensitivity table (each decoder layer fine-tuned alone at 25% of its channels for a few
   steps), the cost profile of this machine, and one Pock plan per time budget in `--budgets` (fractions of a full
   fine-tuning step). The first budget's plan is "the planned scheme"; the others show the budget trade-off.
3. Train every method for `--steps` steps of `--batch` rows (same batches, same order, same seed).
4. Evaluate the base model and every trained model on the test splits (first `--limit` rows each, log-likelihood
   multiple choice) and by validation loss. Equal wall-clock: full fine-tuning and LoRA are also evaluated as they
   were when they had trained for as long as the planned Pock scheme took in total.

Writes `quality.json`, `quality.md` and `quality.png` (accuracy and validation loss against training time) to
`--output`; the table, cost profile and plans it measured are kept there and reused by a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_SETS = ("boolq", "arc_easy", "openbookqa")
METHOD_LR = {"full": 2e-5, "lora": 2e-4, "pock": 1e-3}  # each method's usual learning rate for this model size


def training_rows(data_dir: Path, seed: int) -> list[dict]:
    from pock_hf.data import load_instruction_rows

    rows = [
        row for name in TRAIN_SETS for row in load_instruction_rows(data_dir / "commonsense" / name / "train.json")
    ]
    random.Random(seed).shuffle(rows)
    return rows


def plans(model, tokenizer, train, validation, args) -> list:
    """One plan per budget, from a measured sensitivity table and this machine's cost profile (both cached)."""
    from pock_hf import CostProfile, SensitivityTable, make_plan, measure_sensitivity, profile_costs

    table_path, costs_path = args.output / "sensitivity.json", args.output / "costs.json"
    if table_path.exists():
        table = SensitivityTable.from_json(table_path)
    else:
        table = measure_sensitivity(
            model, tokenizer, train, validation, method="measured", granularity="layer", ratios=(0.25,),
            steps=args.sensitivity_steps, batch_size=args.batch, max_length=args.max_length, seed=args.seed,
            resume_path=args.output / "sensitivity.partial.json",
        )  # fmt: skip
        table.to_json(table_path)
        table.plot_heatmap(args.output / "sensitivity.png")
    if costs_path.exists():
        costs = CostProfile.from_json(costs_path)
    else:
        costs = profile_costs(model, batch_size=args.batch, seq_len=args.max_length)
        costs.to_json(costs_path)
    return [make_plan(table, costs, budget_time_ratio=budget) for budget in args.budgets]


def build(method: str, base, scheme: dict | None):
    from peft import LoraConfig, get_peft_model

    from pock_hf import PockConfig, get_pock_model

    model = copy.deepcopy(base)
    if method == "full":
        return model.requires_grad_(True)
    if method == "lora":
        return get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    return get_pock_model(model, PockConfig(scheme=scheme))


def train(
    model, batches: list[dict], lr: float, snapshot_at_s: float | None
) -> tuple[list[float], float, tuple[int, dict] | None]:
    """Train on `batches`; returns the losses, the training time (s) and, when `snapshot_at_s` is given, the step
    count and trainable state at the step where the elapsed time first reached it."""
    from pock_hf.engine.training import make_optimizer, training_step

    model.train()
    optimizer = make_optimizer(model, lr=lr)
    losses, elapsed, snapshot = [], 0.0, None
    for batch in tqdm(batches, desc="training", unit="step", leave=False):
        start = time.perf_counter()
        losses.append(training_step(model, [batch], optimizer).loss)
        elapsed += time.perf_counter() - start
        if snapshot_at_s is not None and snapshot is None and elapsed >= snapshot_at_s:
            snapshot = len(losses), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, elapsed, snapshot


def evaluate(model, tokenizer, tasks, validation_batches, settings) -> dict:
    """Accuracy (with its 95% bootstrap interval and the majority-class rate) per task, and validation loss."""
    from pock_eval.runner import evaluate_task, summarize
    from pock_eval.stats import majority_rate

    from pock_hf.planning.sensitivity import evaluate_loss

    model.eval()
    result = {"validation_loss": evaluate_loss(model, validation_batches)}
    for task in tasks:
        records = evaluate_task(model, tokenizer, task, settings)
        accuracy = summarize(records, ["acc"], settings)["metrics"]["acc"]
        result[task.name] = accuracy | {"majority": majority_rate([r["gold"] for r in records])}
    return result


def table(rows: list[dict], task_names: list[str]) -> str:
    header = "| system | trained for | steps | val. loss | " + " | ".join(task_names) + " | mean acc. |"
    lines = [header, "|" + "---|" * (5 + len(task_names))]
    for row in rows:
        accuracies = [row["eval"][name]["value"] for name in task_names]
        cells = [
            f"{row['eval'][name]['value']:.1%} [{row['eval'][name]['ci_low']:.1%}, {row['eval'][name]['ci_high']:.1%}]"
            for name in task_names
        ]
        lines.append(
            f"| {row['system']} | {row['train_s']:.0f} s | {row['steps']} | {row['eval']['validation_loss']:.3f} | "
            + " | ".join(cells)
            + f" | {sum(accuracies) / len(accuracies):.1%} |"
        )
    majority = [f"{rows[0]['eval'][name]['majority']:.1%}" for name in task_names]
    lines.append("| *majority class* | | | | " + " | ".join(majority) + " | |")
    return "\n".join(lines)


def plot(rows: list[dict], task_names: list[str], path: Path) -> None:
    """Mean accuracy (beside the majority-class rate) and validation loss against training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pock_hf.io.files import save_figure

    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        mean = sum(row["eval"][name]["value"] for name in task_names) / len(task_names)
        colour = "tab:green" if row["system"].startswith("pock") else "tab:grey"
        points = [(accuracy_axes, mean)] + [(loss_axes, row["eval"]["validation_loss"])] * (row["steps"] > 0)
        for axes, value in points:  # the frozen model's loss is in the title: it would flatten the others
            axes.scatter(row["train_s"], value, color=colour)
            axes.annotate(
                row["system"], (row["train_s"], value), fontsize=8, xytext=(4, 2), textcoords="offset points"
            )
    majority = sum(rows[0]["eval"][name]["majority"] for name in task_names) / len(task_names)
    accuracy_axes.axhline(majority, color="tab:red", linestyle="--", linewidth=1, label="majority class")
    accuracy_axes.legend(loc="lower right")
    accuracy_axes.set(xlabel="training time (s)", ylabel=f"mean accuracy ({', '.join(task_names)})",
                      title="Test accuracy vs training time")  # fmt: skip
    frozen = rows[0]["eval"]["validation_loss"]
    loss_axes.set(xlabel="training time (s)", ylabel="validation loss",
                  title=f"Validation loss vs training time (frozen model: {frozen:.3f})")  # fmt: skip
    for axes in (accuracy_axes, loss_axes):
        axes.grid(alpha=0.3)
    save_figure(figure, path)


def write_report(report: dict, output: Path) -> str:
    """quality.json, quality.md and quality.png in `output`; returns the Markdown table."""
    from pock_hf.io.files import atomic_write_text

    task_names = [name for name in report["results"][0]["eval"] if name != "validation_loss"]
    markdown = table(report["results"], task_names)
    atomic_write_text(output / "quality.json", json.dumps(report, indent=2))
    atomic_write_text(output / "quality.md", markdown + "\n")
    plot(report["results"], task_names, output / "quality.png")
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.5, 0.7])
    parser.add_argument("--sensitivity-steps", type=int, default=4)
    parser.add_argument("--validation-rows", type=int, default=64)
    parser.add_argument("--limit", type=int, default=500, help="test rows per task")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--tasks", default=",".join(TRAIN_SETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("runs/quality"))
    parser.add_argument("--report-only", action="store_true", help="redraw the table and plot from quality.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from pock_eval.runner import Settings
    from pock_eval.spec import resolve_task

    from pock_hf.data import InstructionCollator
    from pock_hf.data.default_model import load_model_and_tokenizer
    from pock_hf.planning.sensitivity import as_examples, fixed_batches

    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report = json.loads((args.output / "quality.json").read_text())
        print(write_report(report, args.output))
        return report
    torch.manual_seed(args.seed)
    tasks = [resolve_task(name, args.data_dir, limit=args.limit) for name in args.tasks.split(",")]
    settings = Settings(limit=args.limit, batch_size=args.eval_batch, seed=args.seed, progress=True)
    base, tokenizer = load_model_and_tokenizer(args.model)
    rows = training_rows(args.data_dir, args.seed)
    validation, train_rows = rows[: args.validation_rows], rows[args.validation_rows :]
    examples = as_examples(train_rows[: 4 * args.batch * args.steps], tokenizer, args.max_length)
    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id)
    batches = fixed_batches(examples, collate, args.batch, args.steps, args.seed)
    validation_batches = fixed_batches(as_examples(validation, tokenizer, args.max_length), collate, 8, 8, args.seed)
    schemes = plans(base, tokenizer, train_rows[:512], validation, args)

    runs = [("pock", plan) for plan in schemes] + [("full", None), ("lora", None)]
    results = [
        {
            "system": "base",
            "train_s": 0.0,
            "steps": 0,
            "eval": evaluate(base, tokenizer, tasks, validation_batches, settings),
        }
    ]
    planned_s = None
    for method, plan in runs:
        label = f"pock (budget {plan.budget_time_ratio:g}, cut {plan.cut_layer})" if plan else method
        torch.manual_seed(args.seed)
        model = build(method, base, plan.scheme if plan else None)
        losses, seconds, snapshot = train(model, batches, METHOD_LR[method], planned_s if method != "pock" else None)
        planned_s = planned_s or seconds  # the first plan's training time is the equal-time mark
        results.append(
            {"system": label, "train_s": seconds, "steps": len(losses), "losses": losses,
             "predicted": {"gain": plan.predicted_gain, "step_s": plan.predicted_step_s} if plan else None,
             "eval": evaluate(model, tokenizer, tasks, validation_batches, settings)}
        )  # fmt: skip
        if snapshot is not None:
            steps, state = snapshot
            for name, value in state.items():
                model.get_parameter(name).data.copy_(value)
            results.append(
                {"system": f"{method} at Pock's time", "train_s": planned_s, "steps": steps, "losses": losses[:steps],
                 "eval": evaluate(model, tokenizer, tasks, validation_batches, settings)}
            )  # fmt: skip
        del model
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": results}
    markdown = write_report(report, args.output)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
