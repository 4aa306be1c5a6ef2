"""Training-step cost of a Pock scheme next to full fine-tuning and PEFT LoRA, on one machine, in one run.

    python benchmarks/step_cost.py                       # SmolLM2-135M-Instruct, Alpaca rows, batch 4 x 256
    python benchmarks/step_cost.py --steps 5 --batch 8   # more steps, bigger batch

Each setup runs in its own process (so peak RSS is its own), takes `--warmup` steps, then times `--steps` steps
(forward + backward + AdamW step) and reports the median. Writes `step_cost.json` and `step_cost.md` to `--output`.
The numbers are measurements of this machine at this time, not targets; they are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SETUPS = ("full", "lora", "lora_gc", "pock_stock_loss", "pock")
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_5000.json"


def pock_scheme(num_layers: int, last: int = 4, ratio: float = 0.25) -> dict[str, float]:
    """Every linear module of the last `last` decoder layers at `ratio` of their output channels."""
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    modules += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return {f"model.layers.{i}.{m}": ratio for i in range(num_layers - last, num_layers) for m in modules}


def build(setup: str, model):
    """The model to train under `setup` (all parameters, LoRA r=8 on all linears, or the Pock scheme with or without
    the label-only loss)."""
    from peft import LoraConfig, get_peft_model

    from pock_hf import PockConfig, get_pock_model

    if setup == "full":
        return model
    if setup in ("lora", "lora_gc"):
        lora = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        )
        if setup == "lora_gc":
            lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return lora
    # "pock_stock_loss" turns the label-only loss off, to show what it adds
    config = PockConfig(scheme=pock_scheme(model.config.num_hidden_layers), label_only_loss=setup == "pock")
    return get_pock_model(model, config)


def batches(tokenizer, data: Path, batch: int, max_length: int, count: int) -> list[dict]:
    """`count` batches of Alpaca rows (prompt masked), each padded to exactly `max_length` tokens."""
    from pock_hf.data import InstructionCollator, load_instruction_rows, tokenize_rows

    rows = load_instruction_rows(data)[: batch * count * 4]
    examples, _ = tokenize_rows(rows, tokenizer, max_length=max_length)
    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=max_length)
    return [collate(examples[i * batch : (i + 1) * batch]) for i in range(count)]


def run_one(args) -> dict:
    from pock_hf.default_model import load_model_and_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model = build(args.setup, model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    times = []
    for index, batch in enumerate(
        batches(tokenizer, args.data, args.batch, args.max_length, args.warmup + args.steps)
    ):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {
        "setup": args.setup,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_s": step,
        "tokens_per_s": args.batch * args.max_length / step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cut_layer": getattr(model, "cut_layer", None) if args.setup.startswith("pock") else None,
    }


def table(results: list[dict]) -> str:
    by = {r["setup"]: r for r in results}
    lines = [
        "| setup | trainable | step (s) | tokens/s | peak RSS (MB) | speed-up vs full | vs LoRA | RSS vs LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setup']} | {r['trainable_params'] / 1e6:.2f}M | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {by['full']['step_s'] / r['step_s']:.2f}x | "
            f"{by['lora']['step_s'] / r['step_s']:.2f}x | {r['peak_rss_mb'] / by['lora']['peak_rss_mb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data", type=Path, default=ALPACA)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--output", type=Path, default=Path("runs/step_cost"))
    parser.add_argument("--setup", help=argparse.SUPPRESS)  # internal: run one setup in this process
    args = parser.parse_args()
    if args.setup:
        print(json.dumps(run_one(args)))
        return
    results = []
    for setup in args.setups.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--setup", setup]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{setup}: {results[-1]['step_s']:.2f} s/step, {results[-1]['peak_rss_mb']:.0f} MB", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "step_cost.json").write_text(json.dumps(results, indent=2))
    (args.output / "step_cost.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
