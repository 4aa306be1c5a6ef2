"""How much of the base model's behaviour a trained scheme keeps: its greedy replies to probe prompts, compared word by
word with the base model's own.

Retention (general questions the base model answers correctly, scored by key word) is what personalisation must not
break, and the table's damage, the loss increase on the base model's replies to the probe prompts, does not predict
it: the schemes that raised that loss least kept the fewest general answers (`benchmarks/replay_damage.py`). That loss
is spread over whole replies, most of it over their rambling tails, while a broken answer changes a reply's first
words (the tuned model answers an everyday question with an invented fact shaped like the user's). So a trained
candidate is scored the way retention is observed, by what it says:

    agreement = mean over probes of (length of the common word prefix of its reply and the base model's reply)
                                      / (the base reply's length in words, at most `words`)

Words are compared case-folded, without surrounding punctuation. 1 is unchanged behaviour on every probe; the standard
error is taken over the probes. The planner keeps only the measured candidates whose agreement is within noise of
the best one (`planner.make_plan`).
"""

from __future__ import annotations

import math
import statistics
import string
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..engine.generation import REPLY_TOKENS, generate_replies

# the first words of a reply carry its answer ("The capital of Egypt is Cairo."); later ones ramble
AGREEMENT_WORDS = 12


def reply_words(reply: str, limit: int) -> list[str]:
    """The first `limit` words of `reply`, case-folded and stripped of surrounding punctuation."""
    words = (word.strip(string.punctuation).casefold() for word in reply.split())
    return [word for word in words if word][:limit]


def reply_agreement(base_replies: Sequence[str], replies: Sequence[str], words: int = AGREEMENT_WORDS) -> list[float]:
    """Per probe, the share (0..1) of the base reply's first `words` words that `replies[i]` repeats before it first
    differs; a probe whose base reply has no words counts as kept (1.0).

    Raises:
        ValueError: the lists differ in length or are empty, or `words` is below 1.
    """
    if len(base_replies) != len(replies) or not replies:
        raise ValueError(f"need one reply per base reply, got {len(replies)} for {len(base_replies)}")
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    shares = []
    for base, reply in zip(base_replies, replies):
        expected, said = reply_words(base, words), reply_words(reply, words)
        common = 0
        while common < min(len(expected), len(said)) and expected[common] == said[common]:
            common += 1
        shares.append(common / len(expected) if expected else 1.0)
    return shares


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error (0 for a single value)."""
    if len(values) < 2:
        return statistics.fmean(values), 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class ReplyAgreement:
    """Scores a trained model by how its greedy replies to `prompts` agree with `base_replies` (the base model's
    greedy replies to the same prompts, through the chat template, by `engine.generation.generate_replies` with the same
    `max_new_tokens`, so that a reply that did not change is cut at the same place), over the first `words` words."""

    tokenizer: object
    prompts: tuple[str, ...]
    base_replies: tuple[str, ...]
    words: int = AGREEMENT_WORDS
    max_new_tokens: int = REPLY_TOKENS

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.base_replies) or not self.prompts:
            raise ValueError(
                f"need one base reply per probe prompt and at least one prompt, got {len(self.base_replies)} "
                f"replies for {len(self.prompts)} prompts"
            )

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        """The mean agreement (0..1) of `model`'s replies with the base model's, and its standard error."""
        replies = generate_replies(model, self.tokenizer, list(self.prompts), max_new_tokens=self.max_new_tokens)
        return mean_and_se(reply_agreement(self.base_replies, replies, self.words))
