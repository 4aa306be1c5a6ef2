"""The README's evaluation numbers: SmolLM2-135M-Instruct and a quickly tuned Pock adapter on BoolQ, ARC-Easy,
OpenBookQA and PIQA (first 500 test rows each), scored by option log-likelihood and by generated answer, in one
pock-eval run with per-task differences and bootstrap confidence intervals.

    python benchmarks/eval_commonsense.py --output runs/eval_commonsense          # the README run (2-core CPU)
    python benchmarks/eval_commonsense.py --steps 4 --limit 8 --output runs/ec_smoke   # a quick check of the script

1. Train: a Pock adapter (the MLP projections of decoder layers 18-29 at 25% of their output channels, AdamW lr 1e-3,
   batch 8, max_length 256) for `--steps` steps on the shuffled mix of the BoolQ, ARC-Easy and OpenBookQA train
   splits (PIQA has no train split here: it shows transfer). Saved to `<output>/adapter`.
2. Evaluate base and base + adapter with `pock_eval.run_evaluation` (the same as `pock-eval --model default
   --adapter <output>/adapter --tasks boolq,...,piqa_gen --limit 500`); writes `<output>/eval/` and copies the bar
   chart to `--figure`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

TRAIN_SETS = ("boolq", "arc_easy", "openbookqa")
TASKS = ("boolq", "arc_easy", "openbookqa", "piqa", "boolq_gen", "arc_easy_gen", "openbookqa_gen", "piqa_gen")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def train_adapter(args: argparse.Namespace) -> dict:
    """Train and save the adapter; returns what the training run measured."""
    from pock_hf import PockConfig, get_pock_model
    from pock_hf.data import InstructionCollator, load_instruction_rows
    from pock_hf.data.default_model import load_model_and_tokenizer
    from pock_hf.engine.training import make_optimizer, training_step
    from pock_hf.planning.sensitivity import as_examples, fixed_batches

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    rows = [
        row for name in TRAIN_SETS for row in load_instruction_rows(args.data_dir / f"commonsense/{name}/train.json")
    ]
    random.Random(args.seed).shuffle(rows)
    examples = as_examples(rows[: args.batch * args.steps], tokenizer, args.max_length)
    batches = fixed_batches(examples, InstructionCollator(tokenizer.pad_token_id), args.batch, args.steps, args.seed)
    layers = model.config.num_hidden_layers
    scheme = {f"model.layers.{i}.{m}": args.ratio for i in range(args.first_layer, layers) for m in MLP}
    model = get_pock_model(model, PockConfig(scheme=scheme))
    optimizer = make_optimizer(model, lr=args.lr)
    model.train()
    started = time.perf_counter()
    losses = [training_step(model, [batch], optimizer).loss for batch in tqdm(batches, desc="training", unit="step")]
    seconds = time.perf_counter() - started
    model.save_pretrained(args.output / "adapter")
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "layers": f"{args.first_layer}-{layers - 1}",
        "ratio": args.ratio,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": seconds,
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
    }


def main(argv: list[str] | None = None) -> dict:
    from pock_eval.models import System
    from pock_eval.runner import Settings, run_evaluation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--output", type=Path, default=Path("runs/eval_commonsense"))
    parser.add_argument("--figure", type=Path, default=None, help="copy the bar chart here (the README's image)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--first-layer", type=int, default=18)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)

    training = train_adapter(args)
    print(
        f"Trained {training['trainable_params']:,} weights for {args.steps} steps in {training['train_seconds']:.0f} s"
    )
    label = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    systems = [System(label, args.model), System("+ Pock adapter", args.model, str(args.output / "adapter"))]
    settings = Settings(limit=args.limit, batch_size=args.eval_batch, seed=args.seed)
    summary = run_evaluation(systems, TASKS, output=args.output / "eval", data_dir=args.data_dir, settings=settings)
    (args.output / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.output / "eval" / "comparison.png", args.figure)
    print((args.output / "eval" / "summary.md").read_text())
    return {"training": training, "summary": summary}


if __name__ == "__main__":
    main()
