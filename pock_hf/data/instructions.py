"""Instruction data: load Alpaca / chat rows, render them with the model's chat template, mask the prompt out of the labels.

Row shapes (one JSON object per row; other keys are ignored):

- Alpaca: `{"instruction": str, "input": str (optional), "output": str}`
- chat:   `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`

Every token an assistant turn produces, its end-of-turn token included (so the model learns to stop), is labelled; every
other token is -100. Assistant spans are found by rendering the conversation up to each assistant turn with the
tokenizer's own chat template, so no template-specific marker strings are hard-coded here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_dataset
from datasets.exceptions import DatasetsError
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and every HF model's loss) skips
ROLES = ("system", "user", "assistant")
SUFFIXES = (".json", ".jsonl")


class DataFormatError(ValueError):
    """Instruction data that cannot be used; the message names the file, the row or line, and the field."""


# --- loading -------------------------------------------------------------------------------------------------------


def load_instruction_rows(path: str | os.PathLike) -> list[dict]:
    """Read and validate an instruction file: `.json` (a list of row objects) or `.jsonl` (one row object per line).

    The file is checked here first, so that a bad file fails with a message naming the line (JSONL, 1-based) or row
    (JSON, 0-based) and field, then read through `datasets`; its cache goes to a temporary folder, not next to the data.
    Keys `datasets` fills with `None` to unify rows of different shapes are removed again.

    Raises:
        FileNotFoundError: `path` is not a file.
        DataFormatError: unknown suffix, empty file, malformed JSON, not a list of objects, or a row of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Instruction data file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataFormatError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    text = _read_utf8(path)
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty")
    parsed = _parse_jsonl(text, path) if path.suffix == ".jsonl" else _parse_json(text, path)
    for where, row in parsed:
        check_row(row, where)
    with tempfile.TemporaryDirectory(prefix="pock_hf-datasets-") as cache_dir:
        try:
            dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        except DatasetsError as error:  # e.g. an integer too large for Arrow in a field pock_hf does not use
            cause = error.__cause__ or error
            raise DataFormatError(f"{path}: the datasets library cannot read this file: {cause}") from error
        rows = dataset.to_list()
    return [{key: value for key, value in row.items() if value is not None} for row in rows]


def _read_utf8(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark (Windows editors write one) is dropped.

    Raises:
        DataFormatError: the file is not UTF-8 (named with the line and byte of the first bad byte).
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}, line {line}: not UTF-8 text (byte {error.start} is {raw[error.start : error.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def _parse_json(text: str, path: Path) -> list[tuple[str, object]]:
    """`(where, row)` pairs of a JSON list; `where` names the file and 0-based row index for error messages."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
        ) from None
    if not isinstance(data, list):
        hint = " (one object per line is JSON Lines: name the file .jsonl)" if isinstance(data, dict) else ""
        raise DataFormatError(f"{path}: expected a JSON list of row objects, got a {type(data).__name__}{hint}")
    if not data:
        raise DataFormatError(f"{path}: the list holds no rows")
    return [(f"{path}, row {index} (0-based)", row) for index, row in enumerate(data)]


def _parse_jsonl(text: str, path: Path) -> list[tuple[str, object]]:
    """`(where, row)` pairs of a JSON Lines text, blank lines skipped; `where` names the file and 1-based line number."""
    parsed = []
    # split on newlines only: str.splitlines also splits at U+2028 and other characters JSON strings may hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((f"{path}, line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataFormatError(
                f"{path}, line {number}: not valid JSON (column {error.colno}): {error.msg}"
            ) from None
    return parsed


def check_row(row: object, where: str = "row") -> str:
    """Validate one row and return its shape, `"alpaca"` or `"chat"`.

    Raises:
        DataFormatError: the row is not an object, or a required field is missing or of the wrong type; the message
            starts with `where` and names the field.
    """
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected an object, got a {type(row).__name__}")
    if "messages" in row:
        _check_messages(row["messages"], where)
        return "chat"
    if "instruction" not in row and "output" not in row:
        raise DataFormatError(
            f"{where}: missing field 'instruction' (Alpaca rows need 'instruction' and 'output', chat rows need "
            f"'messages'); found fields {sorted(row, key=str)}"
        )
    for field in ("instruction", "output"):
        if field not in row:
            raise DataFormatError(f"{where}: missing field {field!r}")
        _check_text(row[field], where, field)
    if not row["instruction"].strip():
        raise DataFormatError(f"{where}: field 'instruction' is empty")
    if row.get("input") is not None:
        _check_text(row["input"], where, "input")
    return "alpaca"


def _check_text(value: object, where: str, field: str) -> None:
    """Raise `DataFormatError` unless `value` is a string of valid Unicode (JSON can spell unpaired surrogates such as
    "\\ud800", which no tokenizer can encode and `datasets` would silently drop)."""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataFormatError(
            f"{where}: field {field!r} holds an unpaired surrogate {value[error.start]!r} at character {error.start}, "
            "which is not text"
        ) from None


def _check_messages(messages: object, where: str) -> None:
    """Raise `DataFormatError` unless `messages` is a list of `{role, content}` with a user turn before an assistant."""
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    seen_user = False
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataFormatError(f"{where}: field {field!r} must be an object, got a {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise DataFormatError(f"{where}: field '{field}.role' must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise DataFormatError(f"{where}: field '{field}.content' must be a string, got {message.get('content')!r}")
        _check_text(message["content"], where, f"{field}.content")
        if message["role"] == "assistant" and not seen_user:
            raise DataFormatError(f"{where}: field {field!r} is an assistant turn before any user turn")
        seen_user = seen_user or message["role"] == "user"
    if not any(message["role"] == "assistant" for message in messages):
        raise DataFormatError(f"{where}: field 'messages' has no assistant turn, so there is nothing to learn")


# --- formatting ----------------------------------------------------------------------------------------------------


def to_messages(row: dict, *, system_prompt: str | None = None) -> list[dict]:
    """The chat messages of a row (validated with `check_row`).

    Alpaca rows become `[system?, user, assistant]`, the user turn being the instruction, plus a blank line and the
    input when the input is non-empty. Chat rows keep their messages (as `{role, content}` copies); `system_prompt`
    is prepended only when the row has no system message of its own.
    """
    if check_row(row) == "chat":
        messages = [{"role": message["role"], "content": message["content"]} for message in row["messages"]]
    else:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def assistant_spans(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the tokenizer's chat template; return the text and the `[start, end)` character span of
    each assistant turn, from after the template's assistant header through its end-of-turn marker.

    A turn's span starts where `messages[:i]` rendered with the generation prompt ends, and ends where `messages[:i+1]`
    ends, minus trailing whitespace (the newline a template writes after the end-of-turn token is not the model's to
    predict: at inference the end-of-turn token stops generation).

    Raises:
        DataFormatError: the template does not render a conversation's prefixes as prefixes of its full text (some
            templates rewrite earlier turns), so assistant turns cannot be located.
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataFormatError(
                f"The chat template of {tokenizer.name_or_path!r} does not render the conversation up to message "
                f"{index} as a prefix of the whole conversation, so the assistant turn cannot be located for labels."
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat-template text of `messages` (transformers returns a `str` when `tokenize=False`)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# --- tokenization --------------------------------------------------------------------------------------------------


@dataclass
class TokenizeReport:
    """What `tokenize_rows` did: rows kept, rows dropped because the prompt alone reached `max_length`, and kept rows
    whose answer was cut at the end to fit."""

    kept: int = 0
    dropped_too_long: int = 0
    dropped_empty_answer: int = 0
    truncated: int = 0

    def __str__(self) -> str:
        total = self.kept + self.dropped_too_long + self.dropped_empty_answer
        return (
            f"kept {self.kept} of {total} rows; dropped {self.dropped_too_long} whose prompt alone fills max_length "
            f"and {self.dropped_empty_answer} with an empty answer; cut the answer short in {self.truncated}"
        )


def tokenize_example(
    row: dict, tokenizer: PreTrainedTokenizerBase, *, max_length: int, system_prompt: str | None = None
) -> dict | None:
    """Token ids, attention mask and labels (lists of ints, at most `max_length` long) for one row.

    Labels are the token ids on assistant tokens (every assistant turn of a chat row, end-of-turn token included) and
    -100 elsewhere. Rows longer than `max_length` tokens keep their prompt whole and lose the end of the answer; a
    row whose prompt alone is `max_length` tokens or more, or an Alpaca row with an empty `output` (real data sets
    have some), returns `None` (`tokenize_rows` counts these).

    Raises:
        DataFormatError: the row is malformed, or the chat template cannot be used to locate assistant turns.
        TypeError: the tokenizer is not a fast (Rust `tokenizers`) one, which character offsets require.
    """
    example, _ = _tokenize(row, tokenizer, max_length=max_length, system_prompt=system_prompt)
    return example


def tokenize_rows(
    rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, *, max_length: int, system_prompt: str | None = None
) -> tuple[list[dict], TokenizeReport]:
    """`tokenize_example` over `rows`, dropping (and counting) rows whose prompt does not fit or whose answer is empty;
    logs a warning with the counts when any row is dropped.

    Raises:
        DataFormatError: a row is malformed; the message names its 0-based index and the field.
    """
    examples, report = [], TokenizeReport()
    for index, row in enumerate(rows):
        example, outcome = _tokenize(
            row, tokenizer, max_length=max_length, system_prompt=system_prompt, where=f"row {index} (0-based)"
        )
        if example is None:
            report.dropped_too_long += outcome == "too_long"
            report.dropped_empty_answer += outcome == "empty_answer"
            continue
        examples.append(example)
        report.kept += 1
        report.truncated += outcome == "truncated"
    if report.dropped_too_long or report.dropped_empty_answer:
        logger.warning("Tokenized instruction data with max_length=%d: %s", max_length, report)
    return examples, report


def _tokenize(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    system_prompt: str | None,
    where: str = "row",
) -> tuple[dict | None, str]:
    """`(example or None, outcome)`, outcome one of "kept", "truncated", "too_long", "empty_answer"; see
    `tokenize_example`."""
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    if not tokenizer.is_fast:
        raise TypeError(
            f"{type(tokenizer).__name__} gives no character offsets; load a fast tokenizer (use_fast=True)"
        )
    if check_row(row, where) == "alpaca" and not row["output"].strip():
        return None, "empty_answer"
    text, spans = assistant_spans(to_messages(row, system_prompt=system_prompt), tokenizer)
    # The template writes the special tokens (BOS included, where it has one) into the text: add none a second time.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoding["offset_mapping"])
    ]
    first_label = next((index for index, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first_label is None:  # e.g. a template that skips empty assistant turns
        raise DataFormatError(f"{where}: the chat template renders no assistant tokens, so there is nothing to learn")
    if first_label >= max_length:
        return None, "too_long"
    truncated = any(label != IGNORE_INDEX for label in labels[max_length:])
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    example = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    return example, "truncated" if truncated else "kept"


# --- batching ------------------------------------------------------------------------------------------------------


@dataclass
class InstructionCollator:
    """Batch examples from `tokenize_rows` into tensors; usable as `data_collator` of `transformers.Trainer`.

    Padded (default): `input_ids`, `attention_mask`, `labels` of shape (B, T), right-padded with `pad_token_id`,
    `attention_mask` 0 and `labels` -100; T is the longest example, rounded up to a multiple of
    `pad_to_multiple_of` when given.

    `packed=True` (padding-free): the examples end to end in one row, `input_ids`, `labels` and `position_ids` of
    shape (1, N), N the examples' total length, with no `attention_mask`. `position_ids` restart at 0 for every
    example, and transformers turns them into a block-causal mask (no token attends across examples) when the model
    is called without `attention_mask` and without a KV cache: call it with `use_cache=False`, as pock_hf's training
    step, measurement and cost profile do. Each example's first label is -100, so no position predicts across a
    boundary; loss and gradients equal the padded batch's (tests/test_packing.py).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    packed: bool = False

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if self.packed:
            return pack_examples(examples)
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, example in enumerate(examples):
            for key, values in batch.items():
                values[row, : len(example["input_ids"])] = torch.as_tensor(example[key], dtype=torch.long)
        return batch


def pack_examples(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The examples as one padding-free row (see `InstructionCollator(packed=True)`)."""
    input_ids, labels, positions = [], [], []
    for example in examples:
        length = len(example["input_ids"])
        input_ids.append(torch.as_tensor(example["input_ids"], dtype=torch.long))
        example_labels = torch.as_tensor(example["labels"], dtype=torch.long).clone()
        example_labels[0] = IGNORE_INDEX  # the previous example's last position must not predict this token
        labels.append(example_labels)
        positions.append(torch.arange(length, dtype=torch.long))
    return {
        "input_ids": torch.cat(input_ids).unsqueeze(0),
        "labels": torch.cat(labels).unsqueeze(0),
        "position_ids": torch.cat(positions).unsqueeze(0),
    }


def real_token_count(batch: dict) -> int:
    """Tokens of a batch that are not padding (a packed batch has none)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def model_inputs(batch: dict) -> dict:
    """The decoder's inputs of a batch (padded or packed): everything but the labels."""
    return {key: value for key, value in batch.items() if key != "labels"}
