"""Answer extraction: turn a generated reply into the answer it gives, or None when it gives none or several.

Rules, in order, for every answer type:

1. An explicit statement wins: the last `answer is X` / `answer: X` (or `#### X` for numbers) in the reply.
2. Otherwise choices and yes/no take the one option the reply names; a reply naming several options (for example
   echoing the `answer1/answer2/...` format line) gives no answer, since guessing would reward hedging.
   Numbers take the last number in the reply (worked solutions end with the result).

Matching ignores case, surrounding punctuation and markdown; `answer 1`, `Answer #1` and `answer1` are one option.
Numbers accept thousands separators (`1,234`), currency signs and units (`$5`, `12 km`, `40%`) and fractions (`3/4`).
"""

from __future__ import annotations

import re

from .text_metrics import normalize_text

EXPLICIT = re.compile(r"\banswer\s*(?:is|:|=)\s*|####\s*", re.IGNORECASE)
# A sign only where it cannot be a minus between two terms ("3-2"); thousands groups of exactly three digits.
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
LEADING_NOISE = " \t\n\"'*_`([{:.-"
YES, NO = ("yes", "true"), ("no", "false")


def extract_answer(reply: str, answer_type: str, choices: list[str] | None = None) -> str | None:
    """The answer `reply` gives, as a string comparable with `is_correct`; None when there is none or it is ambiguous.

    `answer_type` is one of `choice` (one of `choices`, returned as spelled there), `yes_no` (`"yes"` / `"no"`),
    `number` (the number, without separators) or `text` (the reply, stripped).
    """
    if answer_type == "choice":
        if not choices:
            raise ValueError("choice answers need the list of options")
        return extract_choice(reply, choices)
    if answer_type == "yes_no":
        return extract_yes_no(reply)
    if answer_type == "number":
        number = extract_number(reply)
        return None if number is None else format_number(number)
    if answer_type == "text":
        return reply.strip()
    raise ValueError(f"unknown answer type {answer_type!r}")


def extract_choice(reply: str, choices: list[str]) -> str | None:
    """The one option of `choices` that `reply` states or names (see the module docstring), else None."""
    patterns = {choice: _choice_pattern(choice) for choice in choices}
    stated = [
        choice
        for after in _after_explicit(reply)
        for choice, pattern in patterns.items()
        if pattern.match(after.lstrip(LEADING_NOISE))
    ]
    if stated:
        return stated[-1]
    # a lettered option (`A`, `B`) is named only as a capital letter: "a" and "I" are words
    named = [choice for choice in choices if _choice_pattern(choice, ignore_case=not _is_letter(choice)).search(reply)]
    return named[0] if len(named) == 1 else None


def extract_yes_no(reply: str) -> str | None:
    """`"yes"` or `"no"` (true/false count as yes/no): stated after `answer is`, else the reply's first word, else the
    only one of true/false the reply names; None otherwise. Mid-sentence yes/no are not read ("there is no ...")."""
    for after in reversed(_after_explicit(reply)):
        polarity = _polarity(after)
        if polarity:
            return polarity
    first = _polarity(reply)
    if first:
        return first
    named = {word for word in ("true", "false") if re.search(rf"\b{word}\b", reply, re.IGNORECASE)}
    return ("yes" if named == {"true"} else "no") if len(named) == 1 else None


def extract_number(reply: str) -> float | None:
    """The number after the last `answer is` / `####`, else the last number in `reply`; None if it has none."""
    for after in reversed(_after_explicit(reply)):
        match = NUMBER.search(after.replace("$", ""))
        if match:
            return parse_number(match.group())
    found = NUMBER.findall(reply.replace("$", ""))
    return parse_number(found[-1]) if found else None


def parse_number(text: str) -> float:
    """`"1,234.5"` -> 1234.5, `"3/4"` -> 0.75 (a zero denominator gives inf: never equal to a gold answer)."""
    text = text.replace(",", "")
    numerator, _, denominator = text.partition("/")
    if denominator:
        return float(numerator) / float(denominator) if float(denominator) else float("inf")
    return float(text)


def format_number(number: float) -> str:
    """A canonical spelling: integers without a decimal point (`18`), others with up to 6 significant decimals."""
    return str(int(number)) if number.is_integer() else f"{number:.6g}"


def is_correct(prediction: str | None, gold: str, answer_type: str, tolerance: float = 1e-4) -> bool:
    """Whether an extracted `prediction` matches the `gold` answer of the task's data.

    Gold numbers are extracted like replies are (GSM8K's gold is a worked solution ending in `#### 18`); gold yes/no
    may be spelled true/false; `text` compares after lower-casing and removing punctuation and articles.
    """
    if prediction is None:
        return False
    if answer_type == "number":
        gold_number = extract_number(gold)
        return gold_number is not None and abs(float(prediction) - gold_number) <= tolerance
    if answer_type == "yes_no":
        return prediction == _polarity(gold)
    if answer_type == "choice":
        return prediction.strip().lower() == gold.strip().lower()
    return normalize_text(prediction) == normalize_text(gold)


def _after_explicit(reply: str) -> list[str]:
    """The text after each explicit answer marker, in order."""
    return [reply[match.end() :] for match in EXPLICIT.finditer(reply)]


def _polarity(text: str) -> str | None:
    """ "yes"/"no" if `text` starts (after punctuation and markdown) with yes/no/true/false as a whole word."""
    match = re.match(r"[a-z]+", text.lstrip(LEADING_NOISE).lower())
    word = match.group() if match else ""
    return "yes" if word in YES else "no" if word in NO else None


def _is_letter(choice: str) -> bool:
    return len(choice.strip()) == 1 and choice.strip().isupper()


def _choice_pattern(choice: str, ignore_case: bool = True) -> re.Pattern:
    """A whole-word pattern for `choice` (case-insensitive unless told) that lets `answer1` also be written `answer 1`
    or `answer #1`."""
    parts = [re.escape(part) for part in re.split(r"(?<=[A-Za-z])(?=\d)", choice.strip())]
    return re.compile(r"(?<!\w)" + r"\s*#?\s*".join(parts) + r"(?!\w)", re.IGNORECASE if ignore_case else 0)
