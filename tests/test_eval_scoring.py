"""Log-likelihood scoring and generation of pock_eval against straightforward unbatched references on tiny models."""

from __future__ import annotations

import pytest
import torch
from pock_eval.generate import cut_at_stop, generate_until
from pock_eval.scoring import loglikelihood

from pock_hf import PockConfig, get_pock_model

from .conftest import byte_tokenizer
from .tiny import tiny_llama

REQUESTS = [
    ("Is the sky blue?\nAnswer format: true/false\n", "the correct answer is true"),
    ("Is the sky blue?\nAnswer format: true/false\n", "the correct answer is false"),
    ("x", "q"),  # one-token context and continuation
    ("A much longer context, which makes every other row in its batch padded on the left. ", "ok"),
    ("x", "a longer continuation than the others, padded on the right"),
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before it), one unpadded sequence, full logits."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + continuation_ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return sum(logprobs[len(context_ids) - 1 + j, token].item() for j, token in enumerate(continuation_ids))


@pytest.mark.parametrize("wrap", ["plain", "pock"])
def test_batched_loglik_equals_unbatched_reference(tokenizer, wrap):
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    if wrap == "pock":  # an unmerged Pock adapter with non-zero deltas: the PEFT wrapper must pass everything through
        config = PockConfig(scheme={"model.layers.3.mlp.up_proj": 0.5}, init_weights=False)
        model = get_pock_model(model, config).eval()
    expected = [reference_loglik(model, tokenizer, c, k) for c, k in REQUESTS]
    for batch_size in (1, 2, 3, 8):  # different batch sizes: different padding around every row
        got = loglikelihood(model, tokenizer, REQUESTS, batch_size=batch_size)
        assert [count for _, count in got] == [len(tokenizer(k)["input_ids"]) for _, k in REQUESTS]
        assert [value for value, _ in got] == pytest.approx(expected, abs=1e-4)


def test_loglik_rejects_empty_text(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        loglikelihood(model, tokenizer, [("context", "")])


def test_batched_generation_equals_one_by_one(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    prompts = ["Hello", "A longer prompt, so the others are left-padded", "xyz"]
    alone = [generate_until(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert generate_until(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == alone
    assert tokenizer.padding_side == "right"  # restored


def test_stop_strings_cut_the_reply():
    assert cut_at_stop("answer1\nQuestion: next", ["\n", "Question:"]) == "answer1"
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"
