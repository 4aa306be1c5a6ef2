"""Tiny random Llama models, tiny data sets and the benchmark-script loader for fast tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 4-layer random Llama (hidden 32) in fp32; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.eval()


def tiny_batch(seed: int = 1, batch: int = 2, length: int = 12, vocab: int = TINY_LLAMA["vocab_size"]) -> dict:
    """Random token ids with the first third of each row masked out of the labels, as instruction data is."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def tiny_benchmark_args(root: Path) -> list[str]:
    """Command-line arguments that point a benchmark script at a tiny checkpoint and 8 instruction rows under `root`,
    in batches of 2 x 64 tokens, one warm-up and one timed step, the last 2 layers updated."""
    model = save_tiny_checkpoint(root / "tiny")
    data = root / "rows.json"
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 3)))} for i in range(8)
    ]
    data.write_text(json.dumps(rows))
    common = ["--model", str(model), "--data", str(data), "--batch", "2", "--max-length", "64", "--last-k", "2"]
    return common + ["--warmup", "1", "--steps", "1", "--output", str(root / "out")]


def save_tiny_checkpoint(folder, **overrides):
    """A tiny random Llama with the byte-level chat tokenizer (pad = eos), saved as an ordinary HF checkpoint folder
    that `load_model_and_tokenizer(folder)` and the command-line tools read; returns the folder."""
    from .conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tiny_llama(**{"vocab_size": len(tokenizer), "max_position_embeddings": 512, **overrides}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


COMMONSENSE_OPTIONS = {"boolq": ["true", "false"], "arc_easy": [f"answer{i}" for i in range(1, 5)]}
COMMONSENSE_OPTIONS["openbookqa"] = COMMONSENSE_OPTIONS["arc_easy"]


def write_commonsense(root: Path, rows: int) -> None:
    """BoolQ/ARC-Easy/OpenBookQA-shaped train and test splits of `rows` rows each under root/commonsense, as in
    ../shared/data: every answer cycles through the options."""
    for name, options in COMMONSENSE_OPTIONS.items():
        for split in ("train", "test"):
            data = [
                {
                    "instruction": f"Question {i} of {name}?\n\nAnswer format: {'/'.join(options)}",
                    "input": "",
                    "output": f"the correct answer is {options[i % len(options)]}",
                    "answer": options[i % len(options)],
                }
                for i in range(rows)
            ]
            folder = root / "commonsense" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.json").write_text(json.dumps(data))


def load_benchmark(name: str):
    """The module of benchmarks/<name>.py (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
