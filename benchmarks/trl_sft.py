"""Pock against PEFT LoRA under TRL's SFTTrainer: step time, tokens/s and peak process memory, same data, same steps.

    python benchmarks/trl_sft.py                            # SmolLM2-135M-Instruct, Alpaca, batch 4, max_length 256
    python benchmarks/trl_sft.py --model PATH --steps 2     # another checkpoint (hub id or local path)
    python benchmarks/trl_sft.py --setups lora,pock_label_only --no-gradient-checkpointing

Setups, each in its own process (so its peak memory is its own: RSS on CPU, `torch.cuda.max_memory_allocated` on a
GPU), all on the same Alpaca rows, turned into prompt/completion conversations that SFTTrainer renders with the chat
template, labels (completion only) and pads to the longest row of each batch:

- `lora`: PEFT LoRA r=8 on all linear modules, `trl.SFTTrainer`;
- `pock`: Pock (the last `--last-k` layers' linear modules at `--ratio` of their output channels, or `--scheme`),
  `trl.SFTTrainer`: TRL's fused LM-head loss;
- `pock_label_only`: the same Pock model, `pock_hf.engine.sft_trainer.PockSFTTrainer`: Pock's label-only loss.

SFTConfig's defaults except: float32 (no bf16 autocast), gradient checkpointing as `--gradient-checkpointing` says
(SFTConfig's default: on), no logging or saving. `--warmup` + `--steps` optimizer steps run; a callback times each
one (forward, backward, optimizer step; data loading excluded) and the median of the last `--steps` is reported.
tokens/s counts non-padding tokens: those of the timed steps over their summed time. Writes `trl_sft.json` and
`trl_sft.md` to `--output`. The numbers describe this machine at this time; tests never assert them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def _sibling(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package, and this one reuses speed.py's helpers)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = _sibling("speed")

# setup -> what it is
SETUPS = {
    "lora": "PEFT LoRA r=8, all linears (SFTTrainer)",
    "pock": "Pock, SFTTrainer (TRL's fused LM-head loss)",
    "pock_label_only": "Pock, PockSFTTrainer (Pock's label-only loss)",
}
DEFAULT_SETUPS = ",".join(SETUPS)


def conversations(data: Path, rows: int):
    """The first `rows` instruction rows as a `datasets.Dataset` of prompt/completion conversations."""
    from datasets import Dataset

    from pock_hf.data import load_instruction_rows, to_messages

    loaded = load_instruction_rows(data)[:rows]
    if len(loaded) < rows:
        raise SystemExit(f"{data} has {len(loaded)} rows; {rows} are needed.")
    messages = [to_messages(row) for row in loaded]
    return Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in messages])


class StepTimer(TrainerCallback):
    """A callback recording each optimizer step's wall time (s) and the non-padding tokens it consumed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._start = 0.0
        self._seen = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start, self._seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)
        self.tokens.append(state.num_input_tokens_seen - self._seen)


def make_trainer(args, model, tokenizer, dataset, timer: StepTimer):
    """The setup's trainer (SFTTrainer or PockSFTTrainer) with the benchmark's SFTConfig."""
    from trl import SFTConfig, SFTTrainer

    from pock_hf.engine.sft_trainer import PockSFTTrainer

    config = SFTConfig(
        output_dir=str(args.output / f"trainer_{args.setup}"),
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        bf16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=args.device == "cpu",
        include_num_input_tokens_seen="non_padding",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer_class = PockSFTTrainer if args.setup == "pock_label_only" else SFTTrainer
    return trainer_class(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )


def run_one(args) -> dict:
    """Train one setup in this process; returns its row."""
    from pock_hf.data.default_model import load_model_and_tokenizer
    from pock_hf.engine.memory import peak_memory_mb

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model)
    scheme = speed.load_scheme(args, model.config.num_hidden_layers)
    model = speed.build("lora" if args.setup == "lora" else "pock", model, scheme, args.last_k)
    dataset = conversations(args.data, args.batch * (args.warmup + args.steps))
    timer = StepTimer(device)
    make_trainer(args, model, tokenizer, dataset, timer).train()
    seconds, tokens = timer.seconds[args.warmup :], timer.tokens[args.warmup :]
    if len(seconds) != args.steps:
        raise SystemExit(f"{args.setup}: timed {len(seconds)} steps, expected {args.steps}")
    return {
        "setup": args.setup,
        "what": SETUPS[args.setup],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_s": statistics.median(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "tokens_per_step": sum(tokens) / len(tokens),
        "peak_memory_mb": peak_memory_mb(device),
        "cut_layer": getattr(model, "cut_layer", None) if args.setup.startswith("pock") else None,
    }


def table(results: list[dict]) -> str:
    """Markdown: one row per setup, with step-time speed-up, throughput and memory ratios against LoRA."""
    lora = next((r for r in results if r["setup"] == "lora"), None)
    header = "| setup | trainable | step (s) | tokens/s | peak memory (MB) | speed-up vs LoRA | tokens/s vs LoRA |"
    lines = [f"{header} memory vs LoRA |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [
            r["what"],
            f"{r['trainable_params'] / 1e6:.2f}M",
            f"{r['step_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['peak_memory_mb']:.0f}",
            f"{speed.ratio(r['step_s'], lora, 'step_s', inverse=True)}x",
            f"{speed.ratio(r['tokens_per_s'], lora, 'tokens_per_s')}x",
            speed.ratio(r["peak_memory_mb"], lora, "peak_memory_mb"),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument(
        "--data", type=Path, default=speed.ALPACA, help="instruction rows (Alpaca / chat JSON or JSONL)"
    )
    parser.add_argument("--scheme", type=Path, help="Pock scheme JSON (e.g. from `pock plan`)")
    parser.add_argument("--last-k", type=int, default=4, help="layers of the default Pock scheme")
    parser.add_argument("--ratio", type=float, default=0.25, help="channel ratio of the default Pock scheme")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256, help="SFTConfig.max_length (rows are truncated)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="SFTConfig's default: on"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--setups", default=DEFAULT_SETUPS, help=f"comma-separated, from {list(SETUPS)}")
    parser.add_argument("--output", type=Path, default=Path("runs/trl_sft"))
    parser.add_argument("--setup", help=argparse.SUPPRESS)  # internal: run one setup in this process
    args = parser.parse_args(argv)
    unknown = [s for s in args.setups.split(",") if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; choose from {list(SETUPS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.setup:
        print(json.dumps(run_one(args)))
        return []
    argv = sys.argv[1:] if argv is None else argv
    results = speed.run_setups(__file__, argv, args.setups.split(","))
    markdown = table(results)
    speed.write_results(args, "trl_sft", results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
