"""Data files by path in the layouts public data sets use: the scoring inferred from the rows (multiple choice, maths,
free text), forced with `:mc`, `:gen`, `:math`, `:text`, and errors that name the file and row.

The rows are written here in the shapes of the LLM-Adapters instruction forms of BoolQ, PIQA, SIQA, HellaSwag,
WinoGrande, ARC and OpenBookQA, of AQuA, GSM8K, AddSub / MultiArith / SingleEq / SVAMP, of hub-style rows with an
options or choices list, and of Alpaca.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pock_eval.datafiles import EvalDataError
from pock_eval.models import make_systems
from pock_eval.runner import Settings, run_evaluation
from pock_eval.spec import resolve_task

from .test_eval_tasks import tiny_loader, write_json

BOOLQ = {
    "instruction": "Please answer the following question with true or false, question: is ice cold?\n\n"
    "Answer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}
PIQA = {
    "instruction": "Please choose the correct solution to the question: how to dry a towel?\n\n"
    "Solution1: hang it in the sun\n\nSolution2: put it in the freezer\n\nAnswer format: solution1/solution2",
    "output": "the correct answer is solution1",
    "answer": "solution1",
}
# the row: options and answer format inline, on the line of the sentence
WINOGRANDE_INLINE = {
    "instruction": "Tom lent his bike to Ben because _ needed it.\n\n"
    "Option1: Tom Option2: Ben Answer format: option1/option2",
    "output": "the correct answer is option2",
    "answer": "option2",
}
SIQA = {  # Answer1: .. inline, no answer format line, the gold by its number
    "instruction": "Please choose the correct answer to the question: Kim helped a friend move. How would Kim "
    "feel?\n\nAnswer1: tired Answer2: bored Answer3: angry",
    "answer": "1",
}
HELLASWAG = {
    "instruction": "Please choose the correct ending to complete the given sentence: A man is washing a car. "
    "then\n\nEnding1: , he dries it with a towel. Ending2: , the car flies away. Ending3: , he eats the soap. "
    "Ending4: , it rains cats.\n\nAnswer format: ending1/ending2/ending3/ending4",
    "answer": "ending1",
}
AQUA = {  # lettered, inline, gold by letter
    "instruction": "A train travels 60 km in 1.5 hours. What is its speed in km/h? "
    "Answer Choices: (A) 30 (B) 40 (C) 45 (D) 50 (E) 90",
    "output": "60 / 1.5 = 40. The answer is B.",
    "answer": "B",
}
LETTERED_LINES = {  # ARC / OpenBookQA as exported with one lettered option per line, gold by text
    "question": "Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. helium\nD. neon",
    "answer": "carbon dioxide",
}
OPTIONS_FIELD = {"question": "Which is a fruit?", "options": ["carrot", "apple", "potato"], "answer": 1}
CHOICES_FIELD = {  # ARC as on the hub
    "question": "Which is a mammal?",
    "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}
# the maths row (AddSub / MultiArith / SingleEq form), SVAMP's float-spelled answer, GSM8K's own form
ADDSUB = {
    "instruction": "There are 9 apples in a bowl . Sam ate 2 of them . How many apples are left ? ",
    "output": "9 - 2 = 7. The answer is 7.",
    "answer": "7",
}
SVAMP = {"instruction": "Jo has 3 pens and buys 5 more. How many pens?", "input": "", "answer": "8.0"}
GSM8K = {"question": "Ann has 20 eggs and uses 2. How many are left?", "answer": "20 - 2 = 18\n#### 18"}
ALPACA = {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."}

# rows, the output type inferred, the choices and target of the first row's doc
LAYOUTS = {
    "own_line_boolq": (BOOLQ, "multiple_choice", ["true", "false"], "true"),
    "own_line_piqa": (PIQA, "multiple_choice", ["solution1", "solution2"], "solution1"),
    "inline_option1_option2": (WINOGRANDE_INLINE, "multiple_choice", ["option1", "option2"], "option2"),
    "inline_answer1_answer2": (SIQA, "multiple_choice", ["answer1", "answer2", "answer3"], "answer1"),
    "ending1_hellaswag": (HELLASWAG, "multiple_choice", [f"ending{i}" for i in range(1, 5)], "ending1"),
    "lettered_inline_aqua": (AQUA, "multiple_choice", list("ABCDE"), "B"),
    "lettered_lines_by_text": (
        LETTERED_LINES,
        "multiple_choice",
        ["oxygen", "carbon dioxide", "helium", "neon"],
        "carbon dioxide",
    ),
    "options_field_index": (OPTIONS_FIELD, "multiple_choice", ["carrot", "apple", "potato"], "apple"),
    "choices_field_hub": (CHOICES_FIELD, "multiple_choice", ["shark", "whale", "trout"], "whale"),
    "numeric_answer_addsub": (ADDSUB, "generate_until", None, "7"),
    "numeric_answer_svamp": (SVAMP, "generate_until", None, "8.0"),
    "numeric_answer_gsm8k": (GSM8K, "generate_until", None, "20 - 2 = 18\n#### 18"),
    "free_text_alpaca": (ALPACA, "reference", None, "Red is a primary colour."),
}


def write_rows(folder: Path, name: str, row: dict, count: int = 3, jsonl: bool = False) -> Path:
    rows = [row] * count
    if jsonl:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    return write_json(folder / f"{name}.json", rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_scored_as_its_rows_show(tmp_path, layout):
    row, output_type, choices, target = LAYOUTS[layout]
    task = resolve_task(str(write_rows(tmp_path, layout, row, jsonl=layout.endswith("hub"))))
    doc = task.docs[0]
    assert task.name == layout and task.spec.output_type == output_type and "inferred" in task.spec.description
    assert doc.choices == choices and doc.target == target
    if output_type == "generate_until":
        assert task.spec.answer_type == "number" and task.spec.metrics == ["acc"]
    if output_type == "reference":
        assert task.spec.metrics == ["rouge_l", "token_f1"]
    if layout.endswith(("index", "hub")):  # options only a field lists are shown to the model under the question
        assert doc.text.endswith(f"\n\nA) {choices[0]}\nB) {choices[1]}\nC) {choices[2]}")
    else:
        assert doc.text == row.get("instruction", row.get("question"))


@pytest.mark.parametrize(
    ("row", "kind", "output_type", "answer_type", "target"),
    [
        (WINOGRANDE_INLINE, "mc", "multiple_choice", "choice", "option2"),
        (WINOGRANDE_INLINE, "gen", "generate_until", "choice", "option2"),
        (WINOGRANDE_INLINE, "text", "reference", "text", "the correct answer is option2"),  # `output` is the reference
        (ADDSUB, "math", "generate_until", "number", "7"),
        (ADDSUB, "gen", "generate_until", "number", "7"),  # maths is generated already: `:gen` changes nothing
        (ADDSUB, "text", "reference", "text", "9 - 2 = 7. The answer is 7."),
        (AQUA, "math", "generate_until", "number", None),  # a letter is no number: an error naming the row
        (ADDSUB, "mc", "multiple_choice", "choice", None),  # no options: an error naming the row
    ],
)
def test_forced_kinds(tmp_path, row, kind, output_type, answer_type, target):
    path = write_rows(tmp_path, "rows", row)
    if target is None:
        field = "answer" if kind == "math" else "instruction"
        problem = "expected a number" if kind == "math" else "lists no options"
        with pytest.raises(EvalDataError, match=rf"rows\.json, line 2: field '{field}': {problem}"):
            resolve_task(f"{path}:{kind}")
        return
    task = resolve_task(f"{path}:{kind}")
    assert task.name == f"rows_{kind}" and f"forced by :{kind}" in task.spec.description
    assert (task.spec.output_type, task.spec.answer_type, task.docs[0].target) == (output_type, answer_type, target)


def test_a_bad_row_is_named_with_its_file_line_and_field(tmp_path):
    rows = [WINOGRANDE_INLINE, {**WINOGRANDE_INLINE, "instruction": "Tom lent his bike to Ben."}, WINOGRANDE_INLINE]
    path = write_json(tmp_path / "bad.json", rows)  # `indent=1`: row 2 starts on line 7
    with pytest.raises(EvalDataError, match=r"bad\.json, line 7: field 'instruction': lists no options; expected"):
        resolve_task(str(path))
    wrong_gold = write_json(tmp_path / "gold.json", [WINOGRANDE_INLINE, {**WINOGRANDE_INLINE, "answer": "option3"}])
    with pytest.raises(
        EvalDataError, match=r"line 7: field 'answer': gold answer 'option3' is not one of the options"
    ):
        resolve_task(str(wrong_gold))
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text('{"id": 1, "text": ""}\n{"id": 2, "text": ""}\n')
    with pytest.raises(
        EvalDataError, match=r"nothing\.jsonl, line 1: cannot tell how to score this row: expected opt"
    ):
        resolve_task(str(nothing))
    no_prompt = write_json(tmp_path / "no_prompt.json", [ALPACA, {"output": "Blue."}, ALPACA])
    with pytest.raises(EvalDataError, match=r"line 7: field 'instruction': missing: the prompt is the first of"):
        resolve_task(str(no_prompt))
    with pytest.raises(EvalDataError, match=r"':gen' suffix chooses how a data file"):
        resolve_task("boolq:gen")


def test_files_in_several_layouts_run_end_to_end_on_tiny_models(tmp_path):
    files = {name: write_rows(tmp_path, name, row, count=4) for name, row in [
        ("winogrande", WINOGRANDE_INLINE), ("aqua", AQUA), ("addsub", ADDSUB), ("alpaca", ALPACA),
    ]}  # fmt: skip
    tasks = [*map(str, files.values()), f"{files['winogrande']}:gen"]
    settings = Settings(limit=2, batch_size=2, resamples=50, progress=False)
    systems = make_systems(["default"], [])
    summary = run_evaluation(systems, tasks, output=tmp_path / "out", settings=settings, load=tiny_loader)
    metrics = {name: set(result["metrics"]) for name, result in summary["results"]["SmolLM2-135M-Instruct"].items()}
    assert metrics == {
        "winogrande": {"acc", "acc_norm"},
        "aqua": {"acc", "acc_norm"},
        "addsub": {"acc"},
        "alpaca": {"rouge_l", "token_f1"},
        "winogrande_gen": {"acc"},
    }


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "eval_layouts"


def test_the_readme_example_files_are_read_as_their_layouts():
    kinds = {path.name: resolve_task(str(path)).spec.output_type for path in EXAMPLES.iterdir()}
    assert kinds == {
        "winogrande_inline.json": "multiple_choice",
        "arc_lettered.jsonl": "multiple_choice",
        "piqa_choices.jsonl": "multiple_choice",
        "addsub_math.json": "generate_until",
        "alpaca_text.json": "reference",
    }
