"""Instruction data: loading errors, chat-template label masking, truncation, batching, and the personal data set."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pock_hf.data import (
    IGNORE_INDEX,
    DataFormatError,
    InstructionCollator,
    load_instruction_rows,
    to_messages,
    tokenize_example,
    tokenize_rows,
)
from pock_hf.data.personal import (
    PROFILE_FORMAT,
    PROFILES_DIR,
    builtin_profiles,
    fact_recall,
    is_profile_file,
    load_profile,
    make_personal_dataset,
    write_personal_dataset,
)
from tests.conftest import byte_tokenizer

ALPACA = {"instruction": "Name a primary colour.", "input": "Pick one.", "output": "Blue is a primary colour."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
}


def labelled(example: dict) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def write_rows(path, rows) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))


# --- loading -------------------------------------------------------------------------------------------------------


def test_json_and_jsonl_load_the_same_rows_and_leave_no_cache_behind(tmp_path):
    rows = [ALPACA, {"instruction": "Say hi.", "output": "Hi."}, CHAT]
    for name in ("rows.json", "rows.jsonl"):
        write_rows(tmp_path / name, rows)
    assert load_instruction_rows(tmp_path / "rows.json") == load_instruction_rows(tmp_path / "rows.jsonl") == rows
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rows.json", "rows.jsonl"]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_instruction_rows(tmp_path / "nope.json")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: the file is empty"):
        load_instruction_rows(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataFormatError, match="holds no rows"):
        load_instruction_rows(tmp_path / "empty.json")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n\n" + '{"instruction": "Hi", "output": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_instruction_rows(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"instruction": "a", "output": "b"},', r"not valid JSON \(line 1"),
        (json.dumps(ALPACA), "expected a JSON list of row objects, got a dict .*jsonl"),
        ('[{"instruction": "a", "output": "b"}, "text"]', r"row 1 \(0-based\): expected an object, got a str"),
    ],
)
def test_malformed_json_is_named(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DataFormatError, match=message):
        load_instruction_rows(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "Say hi."}, "missing field 'output'"),
        ({"output": "Hi."}, "missing field 'instruction'"),
        ({"prompt": "Say hi."}, r"missing field 'instruction' .* found fields \['prompt'\]"),
        ({"instruction": "Say hi.", "output": 3}, "field 'output' must be a string, got int"),
        ({"instruction": "  ", "output": "Hi."}, "field 'instruction' is empty"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "field 'messages' has no assistant turn"),
        ({"messages": [{"role": "bot", "content": "Hi"}]}, r"field 'messages\[0\]\.role' must be one of"),
        ({"messages": [{"role": "user"}]}, r"field 'messages\[0\]\.content' must be a string"),
        (
            {"messages": [{"role": "assistant", "content": "Hi"}]},
            r"field 'messages\[0\]' is an assistant turn before any user turn",
        ),
    ],
)
def test_bad_rows_name_the_row_and_field(tmp_path, row, message):
    write_rows(tmp_path / "rows.json", [ALPACA, row])
    with pytest.raises(DataFormatError, match=rf"rows\.json, row 1 \(0-based\): {message}"):
        load_instruction_rows(tmp_path / "rows.json")
    write_rows(tmp_path / "rows.jsonl", [ALPACA, row])
    with pytest.raises(DataFormatError, match=rf"rows\.jsonl, line 2: {message}"):
        load_instruction_rows(tmp_path / "rows.jsonl")
    with pytest.raises(DataFormatError, match=rf"row 1 \(0-based\): {message}"):
        tokenize_rows([ALPACA, row], byte_tokenizer(), max_length=64)


# --- formatting and labels -----------------------------------------------------------------------------------------


def test_alpaca_row_to_messages():
    assert to_messages(ALPACA, system_prompt="Be kind.") == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Name a primary colour.\n\nPick one."},
        {"role": "assistant", "content": "Blue is a primary colour."},
    ]
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "Hi."})[0] == {
        "role": "user",
        "content": "Say hi.",
    }
    assert to_messages(CHAT, system_prompt="ignored: the row has its own")[0]["content"] == "Be brief."


def test_labels_are_the_answer_and_end_of_turn_only(chat_tokenizer):
    example = tokenize_example(ALPACA, chat_tokenizer, max_length=256)
    assert chat_tokenizer.decode(labelled(example)) == "Blue is a primary colour.<|im_end|>"
    first = example["labels"].index(labelled(example)[0])
    prompt = chat_tokenizer.decode(example["input_ids"][:first])
    assert prompt.endswith("Pick one.<|im_end|>\n<|im_start|>assistant\n")
    assert example["labels"][:first] == [IGNORE_INDEX] * first
    assert example["labels"][first:-1] == example["input_ids"][first:-1]
    assert example["labels"][-1] == IGNORE_INDEX  # the newline the template writes after <|im_end|>
    assert example["attention_mask"] == [1] * len(example["input_ids"])


@pytest.mark.parametrize("tokenizer_name", ["chatml", "llama3"])
def test_multi_turn_chat_labels_every_assistant_turn(chat_tokenizer, tokenizer_name):
    tokenizer = chat_tokenizer if tokenizer_name == "chatml" else byte_tokenizer()
    end = "<|im_end|>" if tokenizer_name == "chatml" else "<|eot_id|>"
    example = tokenize_example(CHAT, tokenizer, max_length=512)
    assert tokenizer.decode(labelled(example)) == f"Hello!{end}It is 4.{end}"
    assert tokenizer.decode(example["input_ids"]).count("Hi there") == 1


def test_llama3_template_text_has_a_single_bos():
    example = tokenize_example(ALPACA, byte_tokenizer(), max_length=512)
    assert byte_tokenizer().decode(example["input_ids"]).startswith("<|begin_of_text|><|start_header_id|>user")


def test_truncation_cuts_the_answer_and_drops_rows_whose_prompt_fills_max_length(chat_tokenizer, caplog):
    full = tokenize_example(ALPACA, chat_tokenizer, max_length=512)
    prompt_length = full["labels"].index(labelled(full)[0])
    long_prompt = {"instruction": "word " * 200, "output": "Yes."}

    with caplog.at_level(logging.WARNING, logger="pock_hf.data"):
        examples, report = tokenize_rows([ALPACA, long_prompt, ALPACA], chat_tokenizer, max_length=prompt_length + 3)

    assert (report.kept, report.dropped_too_long, report.truncated) == (2, 1, 2)
    assert str(report) == (
        "kept 2 of 3 rows; dropped 1 whose prompt alone fills max_length and 0 with an empty answer; "
        "cut the answer short in 2"
    )
    assert "dropped 1" in caplog.text
    assert examples[0]["input_ids"] == full["input_ids"][: prompt_length + 3]
    assert chat_tokenizer.decode(labelled(examples[0])) == chat_tokenizer.decode(labelled(full)[:3])
    assert tokenize_example(ALPACA, chat_tokenizer, max_length=prompt_length) is None
    assert len(labelled(tokenize_example(ALPACA, chat_tokenizer, max_length=prompt_length + 1))) == 1


def test_rows_with_an_empty_answer_are_dropped_and_counted(chat_tokenizer, caplog):
    empty = {"instruction": "Say nothing.", "input": "", "output": " "}
    with caplog.at_level(logging.WARNING, logger="pock_hf.data"):
        examples, report = tokenize_rows([ALPACA, empty], chat_tokenizer, max_length=256)
    assert (len(examples), report.kept, report.dropped_empty_answer) == (1, 1, 1)
    assert "1 with an empty answer" in caplog.text
    assert tokenize_example(empty, chat_tokenizer, max_length=256) is None


def test_rows_that_fit_are_neither_cut_nor_reported(chat_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="pock_hf.data"):
        _, report = tokenize_rows([ALPACA, CHAT], chat_tokenizer, max_length=512)
    assert (report.kept, report.dropped_too_long, report.truncated) == (2, 0, 0)
    assert caplog.text == ""


# --- batching ------------------------------------------------------------------------------------------------------


def test_collator_pads_right_and_masks_padding():
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = InstructionCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    assert InstructionCollator(pad_token_id=0)(examples)["input_ids"].shape == (2, 3)


# --- the personal data set -----------------------------------------------------------------------------------------


def test_personal_dataset_is_deterministic_and_splits_phrasings():
    data = make_personal_dataset(seed=0)
    assert data == make_personal_dataset(seed=0)
    assert data != make_personal_dataset(seed=1)
    facts = {row["fact"] for row in data.train}
    assert 24 <= len(facts) <= 32
    assert facts == {row["fact"] for row in data.heldout}  # every fact has training and held-out phrasings
    assert len(data.heldout) == len(facts)  # one held out per fact by default
    assert not {row["instruction"] for row in data.heldout} & {row["instruction"] for row in data.train}
    for row in data.heldout:
        assert row["answer"] in row["output"]
    assert len(data.general) == 40
    assert all(row["answer"] in row["output"] for row in data.general)
    with pytest.raises(ValueError, match="heldout_per_fact must be between 1 and 3"):
        make_personal_dataset(heldout_per_fact=4)


def test_personal_dataset_files_load_and_tokenize(tmp_path, chat_tokenizer):
    paths = write_personal_dataset(tmp_path)
    data = make_personal_dataset()
    assert load_instruction_rows(paths["train"]) == data.train
    assert load_instruction_rows(paths["heldout"]) == data.heldout
    _, report = tokenize_rows(data.train, chat_tokenizer, max_length=96)
    assert (report.kept, report.dropped_too_long, report.truncated) == (len(data.train), 0, 0)


def test_fact_recall_counts_replies_containing_the_answer():
    rows = [{"answer": "Biscotti"}, {"answer": "October 14"}, {"answer": "Ljubljana"}, {"answer": "43"}]
    replies = ["Your dog is called biscotti!", "It is on October 15.", "You live in Ljubljana.", "Size 42."]
    assert fact_recall(replies, rows) == 0.5
    with pytest.raises(ValueError, match="one reply per row"):
        fact_recall(replies[:2], rows)


@pytest.mark.slow
def test_base_model_knows_the_general_questions_but_not_the_personal_facts(smollm2):
    model, tokenizer = smollm2
    data = make_personal_dataset()
    rows = data.general + data.heldout
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["instruction"]}], tokenize=False, add_generation_prompt=True
        )
        for row in rows
    ]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues every row's end
    try:
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    replies = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # Measured here: 1.0 and 0.0. The margins absorb a greedy token flipping on other CPUs' float rounding.
    assert fact_recall(replies[: len(data.general)], data.general) >= 0.8
    assert fact_recall(replies[len(data.general) :], data.heldout) <= 0.1


# --- profiles: the user's own facts ------------------------------------------------------------------------------------


def test_every_shipped_profile_loads_and_splits_into_train_and_heldout():
    assert set(builtin_profiles()) >= {"marisol", "tomasz", "aiko"}
    answers = {}
    for name in builtin_profiles():
        profile = load_profile(name)
        assert len(profile.facts) >= 20 and profile.source.endswith(f"{name}.json")
        data = make_personal_dataset(profile=name)
        assert len(data.heldout) == len(profile.facts)
        assert not {r["instruction"] for r in data.heldout} & {r["instruction"] for r in data.train}
        answers[name] = {fact.answer.casefold() for fact in profile.facts}
    # profiles differ in their facts, so no result rests on one profile's answers
    assert not answers["tomasz"] & answers["aiko"] and not answers["marisol"] & answers["aiko"]


def test_a_users_profile_file_gives_the_same_data_as_the_built_in_one(tmp_path):
    own = tmp_path / "me.json"
    own.write_text((PROFILES_DIR / "tomasz.json").read_text())
    assert is_profile_file(own) and not is_profile_file(tmp_path / "missing.json")
    assert make_personal_dataset(seed=3, profile=own) == make_personal_dataset(seed=3, profile="tomasz")
    assert make_personal_dataset() == make_personal_dataset(profile="marisol")


def _profile(**fact) -> dict:
    base = {"key": "dog", "answer": "Biscotti", "statement": "Your dog is Biscotti.", "questions": ["a?", "b?"]}
    return {"format": PROFILE_FORMAT, "version": 1, "name": "x", "facts": [{**base, **fact}]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps([1, 2]), "not a profile"),
        (json.dumps({**_profile(), "version": 9}), "profile version 9"),
        (json.dumps({**_profile(), "facts": []}), "'facts' must be a non-empty list"),
        (json.dumps(_profile(answer="")), r"fact 0 \(0-based\): field 'answer'"),
        (json.dumps(_profile(questions=["same?", "same?"])), "at least two distinct phrasings"),
        (json.dumps(_profile(questions="a?")), "field 'questions' must be a list"),
        (json.dumps(_profile(answer="Pretzel")), "does not appear in the statement"),
        (
            json.dumps({**_profile(), "facts": _profile()["facts"] * 2}),
            r"fact 1 \(0-based\): key 'dog' is used by an earlier fact",
        ),
    ],
)
def test_a_bad_profile_file_is_named_with_its_fact_and_field(tmp_path, content, message):
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message) as error:
        load_profile(path)
    assert str(path) in str(error.value)


def test_an_unknown_built_in_profile_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown built-in profile 'nobody'.*'marisol'"):
        load_profile("nobody")
