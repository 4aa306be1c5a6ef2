"""The main job on the embedded default: on-device personalisation of SmolLM2-135M-Instruct with a Pock adapter.

    python -m pock_hf.demo --output runs/demo        # what `make demo` runs (a few minutes on a 2-core CPU)

It generates a fictional user's profile (facts with several question phrasings, some held out), asks the base
model the held-out questions and a few general ones, trains a sparse Pock scheme on the training phrasings, asks
again, and prints a before/after table. Everything it measured goes to the output folder: `report.json`,
`loss.png`, the adapter (`adapter/`) and the data it trained on (`data/`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import PockConfig, get_pock_model
from .data import InstructionCollator, tokenize_rows
from .default_model import load_model_and_tokenizer
from .personal_data import REPLAY_PROMPTS, fact_recall, make_personal_dataset, replay_rows, write_personal_dataset

MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def demo_scheme(num_layers: int, first: int, ratio: float) -> dict[str, float]:
    """The MLP projections of decoder layers `first`..last at `ratio` of their output channels.

    A hand-made scheme until a measured sensitivity table and the planner choose one.
    """
    return {f"model.layers.{i}.{m}": ratio for i in range(first, num_layers) for m in MLP_MODULES}


@torch.no_grad()
def generate_replies(
    model, tokenizer, questions: list[str], *, max_new_tokens: int = 40, batch: int = 16
) -> list[str]:
    """Greedy replies to single-turn questions through the chat template (left-padded batches)."""
    tokenizer.padding_side = "left"
    replies = []
    model.eval()
    for start in range(0, len(questions), batch):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions[start : start + batch]
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    tokenizer.padding_side = "right"
    return replies


def evaluate(model, tokenizer, data) -> dict:
    """Held-out fact recall and general-answer retention (ratios in [0, 1]) with the replies behind them."""
    heldout = generate_replies(model, tokenizer, [r["instruction"] for r in data.heldout])
    general = generate_replies(model, tokenizer, [r["instruction"] for r in data.general])
    return {
        "fact_recall": fact_recall(heldout, data.heldout),
        "general_retention": fact_recall(general, data.general),
        "heldout_replies": heldout,
        "general_replies": general,
    }


def train(model, examples: list[dict], collate, *, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """AdamW on the trainable (Pock) parameters for `steps` steps over shuffled `examples`; returns the losses."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    losses = []
    model.train()
    pool: list[dict] = []
    for _ in tqdm(range(steps), desc="training (pock)", unit="step"):
        if len(pool) < batch:
            pool += order.sample(examples, len(examples))
        loss = model(**collate(pool[:batch])).loss
        pool = pool[batch:]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses)
    axes.set(xlabel="step", ylabel="training loss (labelled tokens)", title="Pock fine-tune of SmolLM2-135M-Instruct")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def summary_table(before: dict, after: dict) -> str:
    rows = [("held-out fact recall", "fact_recall"), ("general-answer retention", "general_retention")]
    lines = ["| measure | base model | + Pock adapter |", "|---|---|---|"]
    lines += [f"| {label} | {before[key]:.1%} | {after[key]:.1%} |" for label, key in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/demo"))
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--first-layer", type=int, default=18, help="update MLPs of this decoder layer and above")
    parser.add_argument("--ratio", type=float, default=0.25, help="channel ratio of each updated module")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    data = make_personal_dataset(seed=args.seed)
    write_personal_dataset(args.output / "data", seed=args.seed)

    print("Evaluating the base model ...")
    before = evaluate(model, tokenizer, data)
    # the base model's own replies to everyday prompts, trained on beside the facts, keep its general behaviour
    replay = replay_rows(generate_replies(model, tokenizer, list(REPLAY_PROMPTS)))
    examples, report = tokenize_rows(data.train + replay, tokenizer, max_length=256)
    print(
        f"Training rows: {len(data.train)} personal + {len(replay)} self-replay ({report}); "
        f"{len(data.heldout)} held-out questions."
    )

    config = PockConfig(scheme=demo_scheme(model.config.num_hidden_layers, args.first_layer, args.ratio))
    model = get_pock_model(model, config)
    model.print_trainable_parameters()
    print(f"Depth cut at decoder layer {model.cut_layer}: layers below it run no backward.")
    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id)
    train_started = time.perf_counter()
    losses = train(model, examples, collate, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    train_seconds = time.perf_counter() - train_started

    print("Evaluating the tuned model ...")
    after = evaluate(model, tokenizer, data)
    model.save_pretrained(args.output / "adapter")
    plot_losses(losses, args.output / "loss.png")
    trainable, total = model.get_nb_trainable_parameters()
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "scheme": config.scheme,
        "cut_layer": model.cut_layer,
        "trainable_params": trainable,
        "total_params": total,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / args.steps,
        "total_seconds": time.perf_counter() - started,
        "losses": losses,
        "before": before,
        "after": after,
    }
    (args.output / "report.json").write_text(json.dumps(result, indent=2))
    print(summary_table(before, after))
    print(
        f"Trained {trainable:,} of {total:,} parameters for {args.steps} steps in {train_seconds:.0f} s "
        f"({train_seconds / args.steps:.2f} s/step); loss {losses[0]:.2f} -> {losses[-1]:.2f}. "
        f"Report, loss curve and adapter in {args.output}/"
    )
    return result


if __name__ == "__main__":
    main()
