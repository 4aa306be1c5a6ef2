"""The `pock` command: measure a sensitivity table (and the device's cost profile), plan a scheme under a budget, and
talk to the tuned model.

    pock sensitivity --data train.json --out runs/sens/table.json            # embedded SmolLM2, measured mode
    pock sensitivity --model M --data train.json --method proxy --budget-mb 3000 --out table.json
    pock plan --table table.json --costs costs.json --budget-mb 3000 --out scheme.json
    pock plan --table table.json --costs costs.json --device jetson-orin-nano-8gb --out scheme.json
    pock chat --adapter runs/demo/adapter                                    # see pock_hf/chat.py

With a ceiling (`--budget-mb`, `--budget-time-ratio` or `--device`), `pock sensitivity` also trains `--schemes`
schemes of growing size under it, so that `pock plan` can stop where gain saturates instead of spending the budget;
with `--depths`, it trains the table's best scheme at each depth instead, and `pock plan` picks among what they
measured.

User mistakes print one clear message and exit with status 2; `--debug` shows the traceback. An interrupted
`pock sensitivity` resumes from `OUT.partial.json` when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_RATIOS = "0.25,1.0"


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def partial_path(out: Path) -> Path:
    """Where `pock sensitivity --out OUT` keeps the measurement in progress: `OUT` with `.partial.json`."""
    return out.with_suffix(".partial.json")


def parse_layers(text: str) -> list[int]:
    """`"20-29"`, `"3,7,9"` or a mix, as a sorted list of layer indices."""
    layers: set[int] = set()
    try:
        for part in text.split(","):
            start, _, end = part.partition("-")
            layers.update(range(int(start), int(end or start) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like '20-29' or '3,7', got {text!r}") from None
    return sorted(layers)


def add_budget_arguments(group) -> None:
    group.add_argument("--budget-mb", type=positive_float, help="peak process memory ceiling in MB")
    group.add_argument(
        "--budget-time-ratio", type=positive_float, help="step time as a fraction of a full fine-tuning step"
    )
    group.add_argument("--device", help="memory ceiling of a device preset (see `pock plan --help`)")


def resolve_budget_mb(args: argparse.Namespace) -> float | None:
    """`--budget-mb`, or the `--device` preset's, whichever is smaller; None without either."""
    from .planning.costs import DEVICE_BUDGETS_MB

    if not args.device:
        return args.budget_mb
    if args.device not in DEVICE_BUDGETS_MB:
        raise ValueError(f"Unknown device preset {args.device!r}; presets: {sorted(DEVICE_BUDGETS_MB)}.")
    preset = DEVICE_BUDGETS_MB[args.device]
    return preset if args.budget_mb is None else min(args.budget_mb, preset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pock", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    sens = commands.add_parser("sensitivity", help="measure a sensitivity table (+ CSV, heatmap, cost profile)")
    sens.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    sens.add_argument("--data", type=Path, required=True, help="training rows (Alpaca or chat JSON/JSONL)")
    sens.add_argument("--eval-data", type=Path, help="validation rows; default: the last --eval-rows of --data")
    sens.add_argument(
        "--eval-rows", type=positive_int, default=32, help="rows held out of --data when --eval-data is absent"
    )
    sens.add_argument("--max-rows", type=positive_int, help="use only the first N training rows")
    sens.add_argument(
        "--out",
        type=Path,
        required=True,
        help="table JSON; CSV, PNG and costs.json go beside it. Progress is kept in OUT.partial.json: an interrupted "
        "run resumes from it when started again with the same arguments",
    )
    sens.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own Python code (off by default)"
    )
    sens.add_argument("--method", choices=("measured", "proxy"), default="measured")
    sens.add_argument("--granularity", choices=("module", "layer"), default="layer")
    sens.add_argument("--ratios", type=parse_floats, default=parse_floats(DEFAULT_RATIOS))
    sens.add_argument("--modules", help="comma-separated module paths inside a layer, e.g. mlp.up_proj,mlp.down_proj")
    sens.add_argument("--layers", type=parse_layers, help="layer indices, e.g. 20-29 (default: all)")
    sens.add_argument(
        "--steps", type=positive_int, default=8, help="fine-tuning steps per unit (proxy: backward passes)"
    )
    sens.add_argument("--lr", type=positive_float, default=1e-3)
    sens.add_argument("--batch-size", type=positive_int, default=8)
    sens.add_argument("--max-length", type=positive_int, default=256)
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument(
        "--replay-data",
        default="probes",
        help="replay rows for each unit's damage: 'probes' (the base model's replies to everyday prompts, generated "
        "here), 'none', or a JSON/JSONL file of rows",
    )
    sens.add_argument("--proxy-optimizer", choices=("adamw", "sgd"), default="adamw", help="the step the proxy models")
    sens.add_argument("--micro-batch", type=positive_int, help="rows per proxy backward (memory; same result)")
    sens.add_argument(
        "--max-grad-mb",
        type=positive_float,
        help="proxy: weight gradients held at once, MB (default: what --budget-mb leaves beside its activations)",
    )
    sens.add_argument(
        "--schemes", type=int, default=4, help="whole schemes to train under the ceiling for the gain model (0: none)"
    )
    sens.add_argument(
        "--depths",
        type=parse_floats,
        help="measured schemes span depth instead: the table's best under the ceiling reaching the upper fractions "
        "of the layers, e.g. 0.2,0.4,0.6 (`pock plan` then picks among them)",
    )
    sens.add_argument(
        "--blocks",
        default="all",
        help="with --depths: all and/or blocks of a layer, e.g. all,mlp,mlp:0.25 (one ratio)",
    )
    sens.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="profile and train the schemes checkpointed above the cut",
    )
    add_budget_arguments(sens.add_argument_group("ceiling of the measured schemes"))
    sens.add_argument("--no-costs", action="store_true", help="skip profiling this device's costs")
    sens.add_argument("--profile-batch", type=positive_int, default=4, help="batch size of the cost profile")
    sens.add_argument("--profile-seq", type=positive_int, default=128, help="sequence length of the cost profile")

    plan = commands.add_parser("plan", help="choose the scheme with the best gain under a budget")
    plan.add_argument("--table", type=Path, required=True)
    plan.add_argument("--costs", type=Path, required=True)
    add_budget_arguments(plan.add_argument_group("budget ceiling (at least one)"))
    plan.add_argument("--axis", choices=("out", "in"), default="out")
    plan.add_argument(
        "--spend",
        choices=("gain", "budget"),
        default="gain",
        help="gain: the smallest scheme within noise of the best predicted gain; budget: spend the ceiling",
    )
    plan.add_argument(
        "--damage-weight", type=float, default=1.0, help="weight of predicted damage (replay loss increase) vs gain"
    )
    plan.add_argument("--out", type=Path, required=True, help="scheme JSON; the report (.md) and plot (.png) beside")

    talk = commands.add_parser("chat", help="talk to a model, with or without an adapter (lines from stdin)")
    talk.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    talk.add_argument("--adapter", help="a saved Pock (or other PEFT) adapter folder to load on the model")
    talk.add_argument("--system", help="system prompt")
    talk.add_argument("--max-new-tokens", type=positive_int, default=256)
    talk.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    talk.add_argument("--save", type=Path, help="write the conversation (chat messages JSON) here at the end")
    talk.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repository's own Python code (off by default)"
    )
    return parser


def run_sensitivity(args: argparse.Namespace) -> None:
    from .data.default_model import load_model_and_tokenizer
    from .data.instructions import load_instruction_rows
    from .planning.calibration import measure_schemes
    from .planning.costs import profile_costs
    from .planning.sensitivity import measure_sensitivity

    rows = load_instruction_rows(args.data)
    if args.eval_data:
        train_rows, eval_rows = rows, load_instruction_rows(args.eval_data)
    elif len(rows) <= args.eval_rows:
        raise ValueError(f"{args.data} has {len(rows)} rows: too few to hold out {args.eval_rows}; pass --eval-data.")
    else:
        train_rows, eval_rows = rows[: -args.eval_rows], rows[-args.eval_rows :]
    train_rows = train_rows[: args.max_rows] if args.max_rows else train_rows
    budget_mb = resolve_budget_mb(args)
    schemes = args.schemes if budget_mb is not None or args.budget_time_ratio is not None else 0
    if args.schemes < 0 or args.schemes == 1:
        raise ValueError(f"--schemes must be 0 or at least 2 (a curve needs two points), got {args.schemes}.")
    if schemes and args.no_costs:
        raise ValueError(
            "--schemes needs this device's cost profile to plan them; drop --no-costs or pass --schemes 0."
        )
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    replay = load_replay_rows(args.replay_data, model, tokenizer)
    partial = partial_path(args.out)
    if partial.exists():
        print(f"Resuming the measurement kept in {partial}.")
    started = time.perf_counter()
    table = measure_sensitivity(
        model,
        tokenizer,
        train_rows,
        eval_rows,
        method=args.method,
        ratios=args.ratios,
        modules=args.modules.split(",") if args.modules else None,
        layers=args.layers,
        granularity=args.granularity,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        replay_data=replay,
        proxy_optimizer=args.proxy_optimizer,
        micro_batch_size=args.micro_batch,
        max_grad_mb=args.max_grad_mb,
        budget_mb=budget_mb,
        resume_path=partial,
    )
    table.settings["seconds"] = time.perf_counter() - started  # of this run only, when it resumed
    outputs = [
        table.to_json(args.out),
        table.to_csv(args.out.with_suffix(".csv")),
        table.plot_heatmap(args.out.with_suffix(".png")),
    ]
    partial.unlink(missing_ok=True)  # only now: the finished table is on disk
    if not args.no_costs:
        costs = profile_costs(
            model,
            batch_size=args.profile_batch,
            seq_len=args.profile_seq,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        outputs.append(costs.to_json(args.out.parent / "costs.json"))
        if schemes:
            table = measure_schemes(
                model,
                tokenizer,
                table,
                costs,
                train_rows,
                eval_rows,
                replay,
                budget_mb=budget_mb,
                budget_time_ratio=args.budget_time_ratio,
                count=schemes,
                gradient_checkpointing=args.gradient_checkpointing,
                depths=args.depths,
                blocks=args.blocks.split(","),
            )
            table.to_json(args.out)
            print(f"Measured {len(table.schemes)} schemes for the gain model (see `pock plan`).")
    elif not schemes:
        print("No ceiling given: no schemes measured; `pock plan` will spend its whole budget. Pass --budget-mb.")
    best = sorted(table.rows, key=lambda row: row.gain, reverse=True)[:5]
    print(f"Measured {len(table.rows)} units ({args.method}) in {table.settings['seconds']:.0f} s; top units:")
    for row in best:
        print(f"  layer {row.layer:>3} {row.module:<18} ratio {row.ratio:<5g} gain {row.gain:+.4f}")
    print("Wrote " + ", ".join(str(path) for path in outputs))


def run_chat(args: argparse.Namespace) -> None:
    from .chat import run_chat as chat

    chat(args)


def run_plan(args: argparse.Namespace) -> None:
    from .io.files import atomic_write_text
    from .planning.costs import CostProfile
    from .planning.planner import make_plan, plan_report, plot_gain_vs_budget
    from .planning.table import SensitivityTable

    budget_mb = resolve_budget_mb(args)
    if budget_mb is None and args.budget_time_ratio is None:
        raise ValueError("Give a budget: --budget-mb, --budget-time-ratio or --device.")
    table, costs = SensitivityTable.from_json(args.table), CostProfile.from_json(args.costs)
    plan = make_plan(
        table,
        costs,
        budget_mb=budget_mb,
        budget_time_ratio=args.budget_time_ratio,
        axis=args.axis,
        spend=args.spend,
        damage_weight=args.damage_weight,
    )
    report = plan_report(plan, costs)
    outputs = [
        plan.to_json(args.out),
        plot_gain_vs_budget(plan, args.out.with_suffix(".png"), table=table),
        atomic_write_text(args.out.with_suffix(".md"), report + "\n"),
    ]
    print(report)
    print("Wrote " + ", ".join(str(path) for path in outputs))


def load_replay_rows(source: str, model, tokenizer) -> list[dict] | None:
    """Replay rows for damage: None for 'none', the base model's replies to `PROBE_PROMPTS` for 'probes', else the
    rows of a JSON/JSONL file."""
    from .data.instructions import load_instruction_rows
    from .data.personal import PROBE_PROMPTS, replay_rows
    from .engine.generation import generate_replies

    if source == "none":
        return None
    if source == "probes":
        return replay_rows(generate_replies(model, tokenizer, list(PROBE_PROMPTS)), PROBE_PROMPTS)
    return load_instruction_rows(source)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"sensitivity": run_sensitivity, "plan": run_plan, "chat": run_chat}[args.command](args)
    except (ValueError, OSError, ImportError) as error:  # OSError: missing, unreadable or unwritable files
        if args.debug:
            raise
        print(f"pock {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        resume = " Run the same command again to resume." if args.command == "sensitivity" else ""
        print(f"pock {args.command}: interrupted.{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
