"""Reply agreement: the share of the answer words of the base model's replies that a trained model's replies keep."""

from __future__ import annotations

import pytest

from pock_hf.data.default_model import ensure_pad_token
from pock_hf.engine.generation import generate_replies
from pock_hf.planning.agreement import ReplyAgreement, answer_words, kept_shares, mean_and_se, reply_words

from .conftest import byte_tokenizer
from .tiny import tiny_llama


def test_answer_words_are_what_the_first_sentence_adds_to_the_question():
    assert answer_words("What is the capital of Egypt?", "The capital of Egypt is Cairo. It lies on the Nile.") == {
        "cairo"
    }
    assert answer_words("Which ocean lies between Europe and America?", "It is the Atlantic!\nNorth of...") == {
        "atlantic"
    }
    assert answer_words("How many hours are in a day?", "A day is a day.") == frozenset()  # it repeats the question
    assert reply_words("  Hello, (world)!  ok ") == ["hello", "world", "ok"]


def test_a_reply_keeps_the_share_of_answer_words_it_contains():
    answers = [frozenset({"cairo"}), frozenset(), frozenset({"sahara", "africa"}), frozenset({"yen"})]
    replies = ["The capital of Egypt is CAIRO.", "anything", "The Sahara, in the north.", "The Ryaku."]
    # a probe with no answer words is not scored; case and punctuation do not count
    assert kept_shares(answers, replies) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="one reply per probe"):
        kept_shares(answers, replies[:2])
    with pytest.raises(ValueError, match="no probe has answer words"):
        kept_shares([frozenset()], ["x"])


def test_mean_and_standard_error_over_probes():
    mean, se = mean_and_se([1.0, 0.5, 0.0, 0.5])
    assert mean == pytest.approx(0.5) and se == pytest.approx((1 / 6) ** 0.5 / 2)
    assert mean_and_se([0.25]) == (0.25, 0.0)


def test_the_base_model_keeps_its_own_answers_and_another_model_does_not():
    tokenizer = ensure_pad_token(byte_tokenizer())
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    prompts = ("What is the capital of Egypt?", "Name a fruit.", "How many legs does a spider have?")
    base = generate_replies(model, tokenizer, list(prompts), max_new_tokens=8)
    agreement = ReplyAgreement(tokenizer, prompts, tuple(base), max_new_tokens=8)
    assert all(agreement.answers)  # something to keep on every probe
    assert agreement(model) == (1.0, 0.0)
    # other weights, other replies: none of the answer words
    assert agreement(tiny_llama(seed=1, vocab_size=len(tokenizer), max_position_embeddings=256)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="one base reply per probe prompt"):
        ReplyAgreement(tokenizer, prompts, ("only one",))
    with pytest.raises(ValueError, match="no probe has answer words"):
        ReplyAgreement(tokenizer, ("Name a fruit.",), ("A fruit.",))
