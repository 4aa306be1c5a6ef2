"""Which scheme shapes recall held-out facts, and does the validation loss the planner sees say so?

    python benchmarks/scheme_shapes.py --output runs/scheme_shapes                      # ~15 min on a 2-core CPU
    python benchmarks/scheme_shapes.py --plan-dir runs/demo --ceiling 1800 --output runs/scheme_shapes

Every shape trains from the same frozen model (default: the embedded SmolLM2-135M-Instruct) as a planner's measured
scheme does: on the profile's training phrasings minus the measurement's validation rows (the last `--eval-rows`,
as the recipe holds them out) plus the base model's self-replay rows, `--steps` AdamW steps of `--batch` rows at
`--lr` (the demo's settings). Then it reports what the planner sees (the validation loss) beside what the user sees
(held-out fact recall, general-answer retention, held-out loss), and the Spearman correlation of the two over the
shapes. Shapes are data (`SHAPES`: modules, the upper fraction of layers, channel ratio); `--plan-dir` adds the
table's best scheme under `--ceiling` MB at any depth, from a run's `sensitivity.json` and `costs.json` (profiled
with checkpointing, a deep cut costs little memory, so depth is not bounded). Writes `scheme_shapes.json` and `.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
# name -> (modules of a layer, upper fraction of the layers, channel ratio)
SHAPES = {
    "MLPs, upper 20%, 25%": (MLP, 0.2, 0.25),
    "MLPs, upper 40%, 25% (hand-picked)": (MLP, 0.4, 0.25),
    "MLPs, upper 60%, 25%": (MLP, 0.6, 0.25),
    "down_proj, upper 40%, 100%": (("mlp.down_proj",), 0.4, 1.0),
    "every linear, upper 10%, 25%": (ATTENTION + MLP, 0.1, 0.25),
}


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape_scheme(modules: tuple[str, ...], upper: float, ratio: float, num_layers: int) -> dict[str, float]:
    first = num_layers - max(1, round(upper * num_layers))
    return {f"model.layers.{layer}.{m}": ratio for layer in range(first, num_layers) for m in modules}


def unbounded_best(plan_dir: Path, ceiling_mb: float) -> dict[str, float]:
    """The table's best scheme under the ceiling at any depth (what budget-spanning candidates fill up to)."""
    from pock_hf.planning.costs import CostProfile
    from pock_hf.planning.planner import make_plan
    from pock_hf.planning.table import SensitivityTable

    table = SensitivityTable.from_json(plan_dir / "sensitivity.json")
    costs = CostProfile.from_json(plan_dir / "costs.json")
    bare = dataclasses.replace(table, schemes=[], settings={})
    return dict(make_plan(bare, costs, budget_mb=ceiling_mb, spend="budget").scheme)


def run(args: argparse.Namespace) -> list[dict]:
    from pock_hf.data.default_model import load_model_and_tokenizer
    from pock_hf.data.instructions import InstructionCollator, tokenize_rows
    from pock_hf.data.personal import REPLAY_PROMPTS, make_personal_dataset, replay_rows
    from pock_hf.demo import evaluate_personal
    from pock_hf.engine.generation import generate_replies
    from pock_hf.planning.sensitivity import evaluate_loss, fixed_batches, train_scheme
    from pock_hf.tuner import PockConfig

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    data = make_personal_dataset(seed=args.seed, profile=args.profile)
    replay = replay_rows(generate_replies(model, tokenizer, list(REPLAY_PROMPTS)))

    def tokenized(rows: list[dict]) -> list[dict]:
        return tokenize_rows(rows, tokenizer, max_length=256)[0]

    task = tokenized(data.train)
    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id)
    train = fixed_batches(task[: -args.eval_rows] + tokenized(replay), collate, args.batch, args.steps, args.seed)

    def batches(examples: list[dict]) -> list[dict]:
        return [collate(examples[i : i + args.batch]) for i in range(0, len(examples), args.batch)]

    validation, heldout = batches(task[-args.eval_rows :]), batches(tokenized(data.heldout))
    schemes = {name: shape_scheme(*shape, num_layers) for name, shape in SHAPES.items()}
    if args.plan_dir:
        schemes[f"the table's best under {args.ceiling:.0f} MB, any depth"] = unbounded_best(
            args.plan_dir, args.ceiling
        )
    results = []
    for name, scheme in tqdm(schemes.items(), desc="scheme shapes", unit="scheme"):
        started = time.perf_counter()
        wrapped = train_scheme(model, PockConfig(scheme=scheme), train, args.lr, args.seed)
        seconds = time.perf_counter() - started
        try:
            personal = evaluate_personal(wrapped, tokenizer, data)
            row = {
                "shape": name,
                "trainable_params": sum(p.numel() for p in wrapped.parameters() if p.requires_grad),
                "cut_layer": min(int(module.split(".")[2]) for module in scheme),
                "validation_loss": evaluate_loss(wrapped, validation),
                "heldout_loss": evaluate_loss(wrapped, heldout),
                "fact_recall": personal["fact_recall"],
                "general_retention": personal["general_retention"],
                "train_seconds": seconds,
            }
        finally:
            wrapped.unload()
        results.append(row)
        print(row, flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| shape | trainable params | cut | validation loss | held-out loss | fact recall | retention |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['trainable_params'] / 1e6:.1f} M | {r['cut_layer']} | {r['validation_loss']:.3f} "
            f"| {r['heldout_loss']:.3f} | {100 * r['fact_recall']:.1f}% | {100 * r['general_retention']:.0f}% |"
        )
    rho = spearmanr([-r["validation_loss"] for r in results], [r["fact_recall"] for r in results])[0]
    return (
        "\n".join(lines)
        + f"\n\nSpearman (lower validation loss vs higher recall) over {len(results)} shapes: {rho:.2f}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/scheme_shapes"))
    parser.add_argument("--model", help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--profile", default="marisol", help="a built-in profile name or a profile file")
    parser.add_argument("--plan-dir", type=Path, help="a planned run's folder: adds the table's unbounded best")
    parser.add_argument("--ceiling", type=float, default=1800.0, help="MB, with --plan-dir")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--eval-rows", type=int, default=16, help="validation rows held out, as pock.measure_eval_rows"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    results = run(args)
    markdown = table(results)
    _sibling("speed").write_results(args, "scheme_shapes", results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
