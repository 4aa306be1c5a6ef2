"""How a data row lays out its question, options and answer, so that any instruction-row file is evaluated by path.

A row is scored as one of three kinds, tried in this order (`KINDS`):

- `mc`, multiple choice: the row lists options, and its gold answer (`answer`, `answerKey` or `label`) names one of
  them: by label (`option2`, `B`, `2`), or by the option's text.
- `math`: its `answer` is a number (`7`, `8.0`, `1,234`, `3/4`, or a worked solution ending in `#### 18`).
- `text`: it has a reference answer text (`output`, `response`, ...), scored by ROUGE-L and token F1.

Options are found in these layouts (`find_options`), in the prompt text unless said otherwise:

| layout | example | the choices scored |
|---|---|---|
| `answer_format` | `... Answer format: option1/option2` (own line or inline; LLM-Adapters) | the labels |
| `numbered` | `Option1: Tom Option2: Ben`, `Answer1: ..`, `Solution1: ..`, `Ending1: ..` | labels, or texts |
| `lettered` | `A) 21 B) 22`, `(A) 21 (B) 22`, or `A. 21` / `A: 21` each on its own line | labels, or texts |
| `field` | an `options` / `choices` list, or `{"text": [...], "label": [...]}` (ARC on the hub) | the texts |

Options the row names by label are scored by label when the gold answer is a label, as the LLM-Adapters rows' `output`
says them (`the correct answer is option2`), and by text when the gold answer is an option's text. Options given
only as a list field are scored by their text (the gold answer may be the text, a letter, or a 0-based index, the
convention of `datasets` class labels) and are listed under the question as `A) ...` lines.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from .extract import NUMBER
from .text_metrics import normalize_text

KINDS = ("mc", "math", "text")
# prompt fields, the first present is the question; then one context field after a blank line (`pock_hf.data` joins
# `instruction` and `input` the same way when it trains)
PROMPT_FIELDS = ("instruction", "question", "query", "prompt", "problem", "goal", "ctx", "sentence", "input")
CONTEXT_FIELDS = ("input", "context", "passage")
GOLD_FIELDS = ("answer", "answerKey", "label")
REFERENCE_FIELDS = ("output", "response", "completion", "reference", "target", "answer")
OPTION_FIELDS = ("options", "choices")
NUMBERED_WORDS = ("option", "answer", "solution", "ending", "choice", "candidate")

ANSWER_FORMAT = re.compile(r"answer format:[ \t]*(\S[^\n]*?)[ \t.]*$", re.IGNORECASE | re.MULTILINE)
NUMBERED = re.compile(rf"\b({'|'.join(NUMBERED_WORDS)})\s*#?\s*(\d+)\s*[:)]", re.IGNORECASE)
# lettered options: `A)` / `(A)` anywhere after a space, or `A.` / `A:` at the start of a line (inline "A." is too
# often an initial or a sentence end to be read as an option)
LETTERED = (
    re.compile(r"(?<![\w(])\(?([A-Z])\)(?=\s)"),
    re.compile(r"^[ \t]*([A-Z])[.:](?=\s)", re.MULTILINE),
)
GSM8K_GOLD = re.compile(r"####\s*(\S+)\s*$")
OPTION_LAYOUTS = (
    "options (an 'Answer format: a/b' line, 'Option1: ..' / 'Answer1: ..' labels, lettered 'A) ..' options, or an "
    "'options' / 'choices' list)"
)
DESCRIBE = (
    f"{OPTION_LAYOUTS} with the gold one in 'answer', a numeric 'answer', or a reference text "
    f"({' / '.join(repr(name) for name in REFERENCE_FIELDS)})"
)


@dataclass(frozen=True)
class Options:
    """The options of one row: `labels` as the row names them, `texts` where it gives them (same order), `layout`."""

    labels: list[str]
    texts: list[str] | None
    layout: str


def prompt_of(row: dict) -> tuple[str, str] | None:
    """`(field, text)`: the row's question (its first `PROMPT_FIELDS` string), plus a blank line and its first
    non-empty other context field; None when it has none."""
    name = next((f for f in PROMPT_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    if name is None:
        return None
    extra = next((row[f] for f in CONTEXT_FIELDS if f != name and isinstance(row.get(f), str) and row[f].strip()), "")
    return name, row[name] + (f"\n\n{extra}" if extra else "")


def find_options(row: dict, text: str) -> Options | None:
    """The options `row` lists (in its prompt `text` or a list field) in the first layout that has at least two."""
    numbered = _numbered(text)
    labels = answer_format_labels(text)
    if labels is not None:
        # the LLM-Adapters rows list the texts as `Option1: ..` too: keep them, so a gold text is understood
        same = numbered is not None and numbered.labels == [label.lower() for label in labels]
        return Options(labels, numbered.texts if same else None, "answer_format")
    return numbered or _lettered(text) or _field(row)


def answer_format_labels(text: str) -> list[str] | None:
    """The options of the last `Answer format: a/b/...` in `text` (it may follow other text on its line)."""
    matches = ANSWER_FORMAT.findall(text)
    labels = [label.strip() for label in matches[-1].split("/") if label.strip()] if matches else []
    return labels if len(labels) >= 2 else None


def gold_choice(options: Options, gold: str) -> tuple[list[str], str] | None:
    """`(choices, target)`: what to score and which of it is right, given the row's gold answer; None when the gold
    answer names no option."""
    key = _key(gold)
    if not key:
        return None
    if options.layout != "field":
        for label in options.labels:
            if key in (_key(label), _key(label).lstrip(string.ascii_lowercase)):  # `option2`, `Option 2` or `2`
                return options.labels, label
    if options.texts is None:
        return None
    by_text = [text for text in options.texts if normalize_text(text) == normalize_text(gold)]
    if by_text:
        return options.texts, by_text[0]
    if options.layout == "field":
        letters = [_key(label) for label in options.labels]
        if key in letters:
            return options.texts, options.texts[letters.index(key)]
        if key.isdigit() and int(key) < len(options.texts):
            return options.texts, options.texts[int(key)]
    return None


def listed(options: Options) -> str:
    """Options of a list field as lines under the question, for the model to see: `A) first` ..."""
    return "\n".join(f"{label}) {text}" for label, text in zip(options.labels, options.texts or []))


def gold_field(row: dict) -> str | None:
    """The first `GOLD_FIELDS` field the row has."""
    return next((name for name in GOLD_FIELDS if row.get(name) is not None), None)


def is_number(value: object) -> bool:
    """Whether a gold answer is numeric: a JSON number, a string that is one number (`8.0`, `1,234`, `$5`, `3/4`), or
    a worked solution ending in `#### N` (GSM8K)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if not isinstance(value, str):
        return False
    text = value.strip().replace("$", "").rstrip("%").strip()
    ending = GSM8K_GOLD.search(text)
    return NUMBER.fullmatch(ending.group(1) if ending else text) is not None


def reference_field(row: dict) -> str | None:
    """The first `REFERENCE_FIELDS` field holding a non-empty string."""
    return next((f for f in REFERENCE_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)


def row_kinds(row: dict) -> set[str]:
    """The kinds of `KINDS` that `row` can be scored as."""
    kinds = set()
    prompt = prompt_of(row)
    gold = gold_field(row)
    # listed options make a choice row even when its gold answer names none of them: that is an error to report
    if prompt is not None and gold is not None and find_options(row, prompt[1]) is not None:
        kinds.add("mc")
    if prompt is not None and row.get("answer") is not None and is_number(row["answer"]):
        kinds.add("math")
    if prompt is not None and reference_field(row) is not None:
        kinds.add("text")
    return kinds


def infer_kind(rows: list[dict]) -> str | None:
    """The kind to score a file's rows as: the first of `KINDS` that at least half of them fit (a few malformed rows
    then get an error naming them, instead of turning a choice file into a text one), else the one most of them fit;
    None when no row fits any."""
    fits = [row_kinds(row) for row in rows]
    counts = {kind: sum(kind in fit for fit in fits) for kind in KINDS}
    for kind in KINDS:
        if 2 * counts[kind] >= len(rows) and counts[kind]:
            return kind
    best = max(KINDS, key=lambda kind: counts[kind])  # the first of equal counts
    return best if counts[best] else None


def _key(label: str) -> str:
    """`"Option 2"`, `"(B)"`, `"b."` -> `"option2"`, `"b"`, `"b"`: a label as rows and replies spell it loosely."""
    return re.sub(r"[\s#()\[\].:]", "", str(label)).lower()


def _numbered(text: str) -> Options | None:
    """`Option1: Tom Option2: Ben` (any of `NUMBERED_WORDS`): the last run of one word numbered 1, 2, ..."""
    runs: list[list[re.Match]] = []
    for match in NUMBERED.finditer(text):
        number, run = int(match.group(2)), runs[-1] if runs else []
        if number == 1:
            runs.append([match])
        elif run and number == len(run) + 1 and match.group(1).lower() == run[0].group(1).lower():
            run.append(match)
    run = next((run for run in reversed(runs) if len(run) >= 2), None)
    if run is None:
        return None
    labels = [f"{match.group(1).lower()}{match.group(2)}" for match in run]
    return Options(labels, _texts(text, run), "numbered")


def _lettered(text: str) -> Options | None:
    """`A) x B) y`, `(A) x (B) y` or `A. x` lines: the last run of letters A, B, ... in one style."""
    for pattern in LETTERED:
        runs: list[list[re.Match]] = []
        for match in pattern.finditer(text):
            letter = match.group(1)
            if letter == "A":
                runs.append([match])
            elif runs and ord(letter) == ord("A") + len(runs[-1]):
                runs[-1].append(match)
        run = next((run for run in reversed(runs) if len(run) >= 2), None)
        if run is not None:
            return Options([match.group(1) for match in run], _texts(text, run), "lettered")
    return None


def _texts(text: str, run: list[re.Match]) -> list[str]:
    """Each option's text: up to the next option, the last one up to the end of its line (or an `Answer format:`)."""
    ends = [match.start() for match in run[1:]] + [len(text)]
    texts = []
    for match, end in zip(run, ends):
        option = text[match.end() : end]
        if match is run[-1]:
            option = re.split(r"\n|answer format:", option, maxsplit=1, flags=re.IGNORECASE)[0]
        texts.append(option.strip())
    return texts


def _field(row: dict) -> Options | None:
    """An `options` / `choices` field: a list of option texts, or `{"text": [...], "label": [...]}`."""
    for name in OPTION_FIELDS:
        value = row.get(name)
        if isinstance(value, dict) and isinstance(value.get("text"), list):
            texts = [str(text) for text in value["text"]]
            labels = [str(label) for label in value.get("label") or []]
        elif isinstance(value, list):
            texts, labels = [str(text) for text in value], []
        else:
            continue
        if len(texts) >= 2:
            if len(labels) != len(texts):
                labels = list(string.ascii_uppercase[: len(texts)])
            return Options(labels, texts, "field")
    return None
