"""What did a tuned adapter break? The planner's two measures of it, applied to finished runs, on the base model's own
greedy replies to the 20 everyday probe prompts (never trained on): the damage, the loss increase (nats per labelled
token) on those replies, and the reply agreement, the share of their answer words the adapter's own replies keep
(`planning.agreement`); beside them, what they are meant to predict: the general-answer retention, the share of the
general questions (`data.personal.GENERAL`) whose key word the adapter's reply still contains.

    python benchmarks/replay_damage.py runs/personalization/marisol_seed0/hand/adapter \
        runs/personalization/marisol_seed0/planned/adapter --output runs/replay_damage.json

Each adapter is loaded onto the same base model (the embedded SmolLM2-135M-Instruct unless `--model`), in `--dtype`
(the runs' own dtype: `auto` picks bf16 where the CPU computes it fast), and scored on the same replies, so the figures
compare across adapters; set them beside each run's general-answer retention (`report.json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel

from pock_hf.data.default_model import load_model_and_tokenizer
from pock_hf.data.instructions import InstructionCollator, tokenize_rows
from pock_hf.data.personal import GENERAL, PROBE_PROMPTS, fact_recall, replay_rows
from pock_hf.engine.generation import generate_replies
from pock_hf.engine.precision import AUTO, resolve_dtype
from pock_hf.io.files import atomic_write_text
from pock_hf.planning.agreement import ReplyAgreement
from pock_hf.planning.sensitivity import evaluate_loss

BATCH = 4


def replay_damage(adapters: list[Path], model_name: str | None, dtype: str) -> dict[str, dict[str, float]]:
    """{"base": {"loss": the base model's replay loss}, <adapter>: {"damage": its loss increase over that (nats per
    labelled token), "agreement": the share of answer words it keeps, "agreement_se": its standard error, "retention":
    its general-answer retention (0..1)}}."""
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=resolve_dtype(dtype, "cpu").dtype)
    model.eval()
    replies = generate_replies(model, tokenizer, list(PROBE_PROMPTS))
    examples, _ = tokenize_rows(replay_rows(replies, PROBE_PROMPTS), tokenizer, max_length=256)
    collate = InstructionCollator(tokenizer.pad_token_id)
    batches = [collate(examples[i : i + BATCH]) for i in range(0, len(examples), BATCH)]
    base = evaluate_loss(model, batches)
    agreement = ReplyAgreement(tokenizer, PROBE_PROMPTS, tuple(replies))
    general_rows = [{"answer": answer} for _, _, answer in GENERAL]
    result = {"base": {"loss": base}}
    for path in adapters:
        tuned = PeftModel.from_pretrained(model, path)
        tuned.eval()
        kept, kept_se = agreement(tuned)
        general = generate_replies(tuned, tokenizer, [question for question, _, _ in GENERAL])
        result[str(path)] = {
            "damage": evaluate_loss(tuned, batches) - base,
            "agreement": kept,
            "agreement_se": kept_se,
            "retention": fact_recall(general, general_rows),
        }
        model = tuned.unload()  # the deltas live beside the frozen weights: the base model comes back untouched
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", type=Path, help="adapter folders (a run's output.dir/adapter)")
    parser.add_argument("--model", help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=AUTO, help="auto, float32 or bfloat16 (default auto, as the runs)")
    parser.add_argument("--output", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    result = replay_damage(args.adapters, args.model, args.dtype)
    for name, values in result.items():
        print("  ".join(f"{key} {value:+.4f}" for key, value in values.items()), name)
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
