"""Pairwise judging, MT-Bench / AlpacaEval style: a judge model says which of two answers to a question is better.

Each pair is judged twice with the answers' positions swapped, because judges favour a position; a system wins a pair
only if it wins in both orders, an inconsistent or tied pair counts as half a win. A judgement that fails (an
endpoint error or timeout after its retries, or a reply without a verdict) makes the pair *missing*: it is reported
beside the win rate and left out of it, never counted as a tie or a loss.

Judges: `EndpointJudge`, any OpenAI-compatible chat-completions endpoint given by URL (the API key is read from an
environment variable and sent only in the Authorization header: never logged, never written), and `ModelJudge`, a
local Hugging Face chat model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .generate import generate_until

logger = logging.getLogger(__name__)

# The MT-Bench pairwise prompt (lm-sys/FastChat, "pair-v2"), shortened.
SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. Choose the assistant that follows the user's instructions and answers the "
    "question better, considering helpfulness, relevance, accuracy, depth and level of detail. Avoid any position "
    "bias: the order in which the responses were presented must not influence your decision, nor their length. Be as "
    "objective as possible. After a short explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
USER_PROMPT = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]"
    "\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
VERDICT = re.compile(r"\[\[([ABC])\]\]")


class Judge(Protocol):
    """Anything that turns chat conversations into judge replies; None for a conversation it could not answer."""

    name: str

    def complete(self, conversations: Sequence[list[dict]]) -> list[str | None]: ...


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    """The chat messages asking which of two answers is better."""
    user = USER_PROMPT.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(reply: str | None) -> str | None:
    """`"A"`, `"B"` or `"tie"` from the last `[[A]]` / `[[B]]` / `[[C]]` in a judge reply; None when there is none."""
    found = VERDICT.findall(reply or "")
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]] if found else None


@dataclass
class PairOutcome:
    """One judged pair: `score` 1 (the system wins), 0 (the baseline wins), 0.5 (tie or inconsistent) or None
    (missing); the verdicts in both orders (system shown first, then baseline shown first) and the reason a pair is
    missing."""

    score: float | None
    verdict_system_first: str | None
    verdict_baseline_first: str | None
    missing_reason: str | None = None


def judge_pairs(
    judge: Judge, questions: Sequence[str], system_answers: Sequence[str], baseline_answers: Sequence[str]
) -> list[PairOutcome]:
    """Judge each (question, system answer, baseline answer) in both orders; see the module docstring."""
    conversations = []
    for question, answer, baseline in zip(questions, system_answers, baseline_answers, strict=True):
        conversations += [judge_messages(question, answer, baseline), judge_messages(question, baseline, answer)]
    replies = judge.complete(conversations)
    outcomes = []
    for first_reply, second_reply in zip(replies[0::2], replies[1::2]):
        first, second = parse_verdict(first_reply), parse_verdict(second_reply)
        if first is None or second is None:
            failed = first_reply is None or second_reply is None
            reason = "judge request failed" if failed else "judge reply has no [[A]]/[[B]]/[[C]] verdict"
            outcomes.append(PairOutcome(None, first, second, reason))
            continue
        # the system is "A" in the first order and "B" in the second
        system_wins = (first == "A") + (second == "B")
        baseline_wins = (first == "B") + (second == "A")
        score = 1.0 if system_wins == 2 else 0.0 if baseline_wins == 2 else 0.5
        outcomes.append(PairOutcome(score, first, second))
    return outcomes


class EndpointJudge:
    """A judge behind an OpenAI-compatible `POST {url}/chat/completions` endpoint (greedy: temperature 0).

    Each request is tried `1 + retries` times, waiting `backoff * 2**attempt` seconds between tries, with a `timeout`
    in seconds per try; a request that still fails gives None. The API key comes from the environment variable
    `api_key_env` (no key: no Authorization header, as local servers need none).
    """

    def __init__(
        self,
        url: str,
        *,
        model: str = "gpt-4o-mini",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_tokens: int = 512,
    ) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.name = f"{model} @ {self.url}"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.retries, self.backoff, self.max_tokens = retries, backoff, max_tokens

    def complete(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        return [self._complete(messages) for messages in conversations]

    def _complete(self, messages: list[dict]) -> str | None:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        for attempt in range(1 + self.retries):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, KeyError, IndexError) as error:
                # only the URL and the error's kind go to the log: never the headers (they hold the key)
                logger.warning(
                    "judge %s: try %d of %d failed: %s", self.url, attempt + 1, 1 + self.retries, _why(error)
                )
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        return None


def _why(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"{type(error.reason).__name__}: {error.reason}"
    return type(error).__name__


class ModelJudge:
    """A local Hugging Face chat model as the judge (greedy replies of up to `max_new_tokens` tokens)."""

    def __init__(self, model, tokenizer, *, name: str = "local model", max_new_tokens: int = 256, batch_size: int = 8):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def complete(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        prompts = [
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in conversations
        ]
        return generate_until(
            self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
        )
