"""The `pock-eval` command: evaluate models and adapters on tasks; per-example JSONL, summary JSON/Markdown, bar chart.

    pock-eval --tasks boolq,arc_easy --limit 500                       # the embedded SmolLM2-135M-Instruct
    pock-eval --model default --adapter out/adapter --tasks boolq,boolq_gen --limit 500   # base vs base + adapter
    pock-eval --model merged/ --tasks mine.json,mine.json:gen,sums.jsonl,notes.json     # any data file, by path
    pock-eval --adapter out/adapter --tasks mt_bench --judge http://127.0.0.1:8000/v1 --judge-model NAME

Systems: every --model alone, then the first --model with each --adapter; the first system is the baseline that the
others are compared with (paired bootstrap CI of the difference) and judged against. Tasks: shipped names
(`--list-tasks`), spec files (.yaml), or data files (.json/.jsonl), scored as their rows show: options listed in any
common layout (an `Answer format: a/b` line, `Option1: ..` / `Answer1: ..` labels, lettered `A) ..`, an `options` /
`choices` list) by option log-likelihood, a numeric `answer` by the final number of a generated solution, a
reference text by ROUGE-L and token F1; `:mc`, `:gen` (the option a generated reply names), `:math` or `:text` after
the path forces a kind. Shipped specs read data relative to --data-dir.

Mistakes (bad spec or data, missing file) print one message naming the file, line and field and exit with status 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pock_hf.engine.precision import DTYPE_NAMES

from .datafiles import EvalDataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pock-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", default=[], help="hub id, local path or 'default' (repeatable)")
    parser.add_argument("--adapter", action="append", default=[], help="PEFT adapter of the first model (repeatable)")
    parser.add_argument(
        "--tasks", help="comma-separated task names, spec files or data files (data files take :mc :gen :math :text)"
    )
    parser.add_argument("--list-tasks", action="store_true", help="list the shipped tasks and exit")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder shipped specs read data from (default: $POCK_EVAL_DATA or ../shared/data)",
    )
    parser.add_argument("--limit", type=int, help="evaluate the first N rows of each task")
    parser.add_argument("--output", type=Path, default=Path("runs/eval"))
    parser.add_argument("--seed", type=int, default=0, help="few-shot draws and bootstrap")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("auto", *DTYPE_NAMES),
        help="weights' dtype; auto: bfloat16 where the device computes it natively (CUDA >= 8.0, AVX512-BF16/AMX)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the confidence intervals")
    judge = parser.add_argument_group("pairwise judging (tasks with output_type: pairwise)")
    judge.add_argument(
        "--judge", help="an OpenAI-compatible endpoint URL (http...), or a local chat model / 'default'"
    )
    judge.add_argument("--judge-model", default="gpt-4o-mini", help="model name sent to the endpoint")
    judge.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    judge.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per endpoint request")
    judge.add_argument("--judge-retries", type=int, default=2, help="retries of a failed endpoint request")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def make_judge_factory(args: argparse.Namespace, batch_size: int):
    """A function that builds the judge named by `--judge` (None without one)."""
    if not args.judge:
        return None
    if args.judge.startswith(("http://", "https://")):
        from .judge import EndpointJudge

        return lambda: EndpointJudge(
            args.judge,
            model=args.judge_model,
            api_key_env=args.judge_key_env,
            timeout=args.judge_timeout,
            retries=args.judge_retries,
        )

    def local_judge():
        from .judge import ModelJudge
        from .models import load_system, make_systems

        system = make_systems([args.judge], [])[0]
        model, tokenizer = load_system(system, device=args.device, dtype=args.dtype)
        return ModelJudge(model, tokenizer, name=system.label, batch_size=batch_size)

    return local_judge


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_tasks:
            from .spec import load_spec, shipped_tasks

            for name, path in sorted(shipped_tasks().items()):
                spec = load_spec(path)
                print(f"{name:<16} {spec.output_type:<16} {spec.description}")
            return 0
        if not args.tasks:
            raise ValueError("Give --tasks (comma-separated task names, spec files or data files), or --list-tasks.")
        from .models import default_device, make_systems
        from .runner import Settings, run_evaluation

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        args.device = args.device or default_device()
        settings = Settings(
            limit=args.limit,
            batch_size=args.batch_size,
            seed=args.seed,
            resamples=args.bootstrap,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
        summary = run_evaluation(
            make_systems(args.model, args.adapter),
            [name.strip() for name in args.tasks.split(",") if name.strip()],
            output=args.output,
            data_dir=args.data_dir,
            settings=settings,
            make_judge=make_judge_factory(args, args.batch_size),
        )
    except (EvalDataError, ValueError, FileNotFoundError, ImportError) as error:
        if args.debug:
            raise
        print(f"pock-eval: error: {error}", file=sys.stderr)
        return 2
    print((args.output / "summary.md").read_text(), end="")
    print(
        f"Wrote {args.output}/summary.json, summary.md, comparison.png and per-example JSONL for "
        f"{len(summary['systems'])} system(s)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
