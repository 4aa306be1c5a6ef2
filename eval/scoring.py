"""Log-likelihood of continuations given contexts, batched, for multiple-choice scoring.

The options of one question share its context, so each distinct context is run once (left-padded, with its key/value
cache kept) and the options' tokens are run against that cache: on 4-option sets this does ~1/3 of the work of
scoring every (context, option) sequence whole. Only the logits that score a token are computed (`logits_to_keep`),
since the LM head over a 49k vocabulary is a large share of a small model's forward.

Contexts and continuations are tokenized separately and concatenated, so the boundary between them is exact (the
convention of lm-evaluation-harness). The result equals scoring each `context + continuation` alone, unpadded, to
float tolerance, whatever the batch size and padding (a test checks this).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def loglikelihood(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    add_special_tokens: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """`(log p(continuation | context), number of continuation tokens)` for each `(context, continuation)` request,
    in request order; natural log, summed over the continuation's tokens.

    `add_special_tokens` is passed when tokenizing contexts (True for plain-text prompts, so a BOS is added where the
    tokenizer adds one; False for chat-template prompts, which carry their own). `batch_size` is the number of
    distinct contexts per forward pass; their continuations (all options) run in one second pass.

    Raises:
        ValueError: a context or continuation tokenizes to no tokens.
    """
    contexts: dict[str, list[int]] = {}  # context -> indices of its requests, in first-seen order
    for index, (context, _) in enumerate(requests):
        contexts.setdefault(context, []).append(index)
    context_ids = {context: _encode(tokenizer, context, add_special_tokens, "context") for context in contexts}
    continuation_ids = [_encode(tokenizer, continuation, False, "continuation") for _, continuation in requests]
    # longest first: similar lengths share a batch (less padding), and an out-of-memory error comes at once
    order = sorted(contexts, key=lambda context: -len(context_ids[context]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep_logits = _accepts(model, "logits_to_keep")
    # transformers 5.2x renamed `past_key_values` to `cache` (argument and output); older 5.x take the old name
    cache_name = "cache" if _accepts(model, "cache") else "past_key_values"
    results: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="log-likelihood", unit="batch", disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        # 1. contexts, left-padded so that every context ends at the last position                         (B, Lc)
        ids, mask = _pad([context_ids[context] for context in chunk], pad, left=True, device=device)
        extra = {"logits_to_keep": 1} if keep_logits else {}
        output = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, **extra)
        first = torch.log_softmax(output.logits[:, -1].float(), dim=-1)  # predicts each option's first token (B, V)
        # 2. every option of these contexts against a copy of its context's cache, right-padded              (N, Lk)
        members = [(row, index) for row, context in enumerate(chunk) for index in contexts[context]]
        rows = torch.tensor([row for row, _ in members], device=device)
        cache = getattr(output, cache_name)
        cache.batch_select_indices(rows)  # in place: row n now holds the keys/values of its context
        cont, cont_mask = _pad([continuation_ids[index] for _, index in members], pad, left=False, device=device)
        positions = mask.sum(-1)[rows, None] + torch.arange(cont.shape[1], device=device)
        output = model(
            input_ids=cont,
            attention_mask=torch.cat([mask[rows], cont_mask], dim=1),
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
        )
        rest = torch.log_softmax(output.logits.float(), dim=-1)  # position j predicts option token j + 1 (N, Lk, V)
        for n, (row, index) in enumerate(members):
            tokens = continuation_ids[index]
            total = first[row, tokens[0]].item()
            if len(tokens) > 1:
                following = torch.tensor(tokens[1:], device=device)
                total += rest[n, : len(tokens) - 1].gather(-1, following[:, None]).sum().item()
            results[index] = (total, len(tokens))
    return results


def _encode(tokenizer, text: str, add_special_tokens: bool, what: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if not ids:
        raise ValueError(f"The {what} {text!r} tokenizes to no tokens, so it cannot be scored.")
    return ids


def _pad(sequences: list[list[int]], pad: int, *, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, attention_mask)` of shape (B, max length), padded on the left or right."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token, so left padding does not shift them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _accepts(model, argument: str) -> bool:
    """Whether the underlying transformers model's forward takes `argument` (a PEFT wrapper forwards its kwargs)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(inner.forward).parameters
