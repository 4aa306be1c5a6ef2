"""Greedy generation from rendered prompts, batched with left padding, cut at stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from pock_hf.data.default_model import ensure_pad_token


@torch.no_grad()
def generate_until(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    add_special_tokens: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """The greedy continuation of each prompt (already rendered, e.g. through the chat template), in prompt order.

    Generation ends at the model's end-of-sequence token, after `max_new_tokens` tokens, or at the first of the
    `stop` strings, which is cut off together with everything after it. Special tokens are not decoded.
    `add_special_tokens` is passed when tokenizing the prompts (see `scoring.loglikelihood`). A tokenizer without a
    pad token gets its end-of-sequence token as one (`ensure_pad_token`).
    """
    ensure_pad_token(tokenizer)
    lengths = [len(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: -lengths[index])  # batch similar lengths together
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id,
        stop_strings=list(stop) or None,
    )
    device = next(model.parameters()).device
    replies: list[str] = [""] * len(prompts)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt directly
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="generation", unit="batch", disable=not progress, leave=False):
            chunk = order[start : start + batch_size]
            inputs = tokenizer(
                [prompts[index] for index in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(device)
            output = model.generate(**inputs, generation_config=config, tokenizer=tokenizer)
            texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for index, text in zip(chunk, texts):
                replies[index] = cut_at_stop(text, stop)
    finally:
        tokenizer.padding_side = padding_side
    return replies


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest of the `stop` strings (generation stops after a stop string, not before it)."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]
