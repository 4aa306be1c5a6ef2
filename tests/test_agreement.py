"""Reply agreement: how much of the base model's replies a trained candidate keeps, word by word from the start."""

from __future__ import annotations

import pytest
import torch

from pock_hf.data.default_model import ensure_pad_token
from pock_hf.engine.generation import generate_replies
from pock_hf.planning.agreement import ReplyAgreement, mean_and_se, reply_agreement, reply_words

from .conftest import byte_tokenizer
from .tiny import tiny_llama


def test_replies_agree_up_to_the_first_word_that_differs():
    base = ["The capital of Egypt is Cairo.", "A day has 24 hours.", "Cows drink water.", ""]
    replies = ["the capital of EGYPT is Cairo!", "A day has twenty-four hours.", "Milk.", "anything"]
    # case and surrounding punctuation do not count; a base reply with no words is kept whatever is said
    assert reply_agreement(base, replies) == [1.0, 3 / 5, 0.0, 1.0]
    # only the first `words` words are compared: past them a reply may ramble as it likes
    assert reply_agreement(["one two three four"], ["one two three five"], words=3) == [1.0]
    assert reply_agreement(["one two three"], ["one two"]) == [2 / 3]  # a reply that stops early lost the rest
    assert reply_words("  Hello, (world)!  ok ", 2) == ["hello", "world"]


def test_mean_and_standard_error_over_probes():
    mean, se = mean_and_se([1.0, 0.5, 0.0, 0.5])
    assert mean == pytest.approx(0.5) and se == pytest.approx(torch.tensor([1.0, 0.5, 0.0, 0.5]).std().item() / 2)
    assert mean_and_se([0.25]) == (0.25, 0.0)


@pytest.mark.parametrize(
    ("base", "replies", "words", "message"),
    [(["a"], [], 12, "need one reply per base reply"), ([], [], 12, "need one reply"), (["a"], ["a"], 0, "words")],
)
def test_bad_input_is_refused(base, replies, words, message):
    with pytest.raises(ValueError, match=message):
        reply_agreement(base, replies, words)


def test_the_base_model_agrees_with_itself_and_a_changed_model_does_not():
    tokenizer = ensure_pad_token(byte_tokenizer())
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    prompts = ("What is the capital of Egypt?", "Name a fruit.", "How many legs does a spider have?")
    base = generate_replies(model, tokenizer, list(prompts), max_new_tokens=8)
    assert all(reply_words(reply, 12) for reply in base)  # something to agree with on every probe
    agreement = ReplyAgreement(tokenizer, prompts, tuple(base), max_new_tokens=8)
    assert agreement(model) == (1.0, 0.0)
    # other weights, other replies: nothing kept from their first word on
    assert agreement(tiny_llama(seed=1, vocab_size=len(tokenizer), max_position_embeddings=256)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="one base reply per probe prompt"):
        ReplyAgreement(tokenizer, prompts, ("only one",))
