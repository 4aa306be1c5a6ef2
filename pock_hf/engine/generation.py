"""Greedy replies of a causal LM to single-turn questions, through the tokenizer's chat template: how the main job
asks its questions and how the planner reads what a trained candidate says (`planning.agreement`)."""

from __future__ import annotations

import torch

# new tokens of a reply (the facts' and general answers are one sentence)
REPLY_TOKENS = 40


@torch.no_grad()
def generate_replies(
    model, tokenizer, questions: list[str], *, max_new_tokens: int = REPLY_TOKENS, batch: int = 16
) -> list[str]:
    """Greedy replies to single-turn questions through the chat template (left-padded batches)."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch):
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
                for q in questions[start : start + batch]
            ]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(next(model.parameters()).device)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return replies
