"""How much of the base model's knowledge a trained scheme keeps: the answer words of the base model's replies to
probe prompts, looked for in the trained model's own greedy replies.

Retention (general questions the base model answers correctly, scored by a key word in the reply) is what
personalisation must not break, and the table's damage, the loss increase on the base model's replies to the probe
prompts, does not predict it: the schemes that raised that loss least kept the fewest general answers
(`benchmarks/replay_damage.py`). That loss is spread over whole replies, most of it over their rambling tails and
their wording, while retention asks whether the answer is still there. So a trained candidate is scored the way
retention is, with the key words read off the base model's own replies instead of written by hand:

    answer words of a probe = the words of the base reply's first sentence that are neither in the prompt nor
                              function words ("The capital of Egypt is Cairo." to "What is the capital of Egypt?"
                              gives {cairo})
    agreement               = mean over the probes with answer words of the share of them the trained reply contains

Words are compared case-folded, without surrounding punctuation. 1 is every answer kept; the standard error is taken
over the probes. A probe whose base reply has no answer words (it repeats the question) is not scored. The planner
keeps only the measured candidates whose agreement is within noise of the best one (`planner.make_plan`).
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..engine.generation import REPLY_TOKENS, generate_replies

# English function words: never the answer to a question
FUNCTION_WORDS = frozenset(
    """a an the and or but nor so yet of in on at to for from by with about as into onto over under between through
    is are was were be been being am do does did has have had having can could will would shall should may might must
    it its it's this that these those there here he she they we you i me him her them us my your his their our
    what which who whom whose when where why how not no yes very also just only than then too more most some any
    all each every both either neither one known called named typically usually often generally""".split()
)
# a sentence ends at . ! or ? followed by white space, or at a line break
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")


def reply_words(text: str) -> list[str]:
    """The words of `text`, case-folded and stripped of surrounding punctuation."""
    words = (word.strip(string.punctuation).casefold() for word in text.split())
    return [word for word in words if word]


def answer_words(prompt: str, base_reply: str) -> frozenset[str]:
    """The words of `base_reply`'s first sentence that are neither in `prompt` nor function words."""
    first_sentence = SENTENCE_END.split(base_reply.strip(), maxsplit=1)[0]
    asked = set(reply_words(prompt))
    return frozenset(word for word in reply_words(first_sentence) if word not in asked and word not in FUNCTION_WORDS)


def kept_shares(answers: Sequence[frozenset[str]], replies: Sequence[str]) -> list[float]:
    """Per probe with answer words, the share (0..1) of its `answers[i]` that `replies[i]` contains.

    Raises:
        ValueError: the lists differ in length, or no probe has answer words.
    """
    if len(answers) != len(replies):
        raise ValueError(f"need one reply per probe, got {len(replies)} for {len(answers)}")
    shares = []
    for words, reply in zip(answers, replies):
        if words:
            said = set(reply_words(reply))
            shares.append(len(words & said) / len(words))
    if not shares:
        raise ValueError("no probe has answer words to keep: the base model's replies only repeat the prompts")
    return shares


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error (0 for a single value)."""
    if len(values) < 2:
        return statistics.fmean(values), 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


@dataclass(frozen=True)
class ReplyAgreement:
    """Scores a trained model by the share of the answer words of `base_replies` (the base model's greedy replies to
    `prompts`, through the chat template, by `engine.generation.generate_replies` with the same `max_new_tokens`)
    that its own greedy replies to the same prompts still contain.

    Raises:
        ValueError: not one base reply per prompt, or no base reply has answer words.
    """

    tokenizer: object
    prompts: tuple[str, ...]
    base_replies: tuple[str, ...]
    max_new_tokens: int = REPLY_TOKENS
    answers: tuple[frozenset[str], ...] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.base_replies) or not self.prompts:
            raise ValueError(
                f"need one base reply per probe prompt and at least one prompt, got {len(self.base_replies)} "
                f"replies for {len(self.prompts)} prompts"
            )
        answers = tuple(answer_words(prompt, reply) for prompt, reply in zip(self.prompts, self.base_replies))
        if not any(answers):
            raise ValueError("no probe has answer words to keep: the base model's replies only repeat the prompts")
        object.__setattr__(self, "answers", answers)

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        """The mean share (0..1) of answer words `model`'s replies keep, and its standard error."""
        replies = generate_replies(model, self.tokenizer, list(self.prompts), max_new_tokens=self.max_new_tokens)
        return mean_and_se(kept_shares(self.answers, replies))
