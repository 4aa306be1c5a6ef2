"""Task specs and data files: any instruction-row file by path, shipped specs, and errors naming file, line and field;
the runner end to end on a tiny model (records, summary, report, determinism, before/after comparison)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pock_eval.datafiles import EvalDataError
from pock_eval.models import System, make_systems
from pock_eval.runner import Settings, run_evaluation
from pock_eval.spec import load_spec, resolve_task, shipped_tasks
from pock_eval.stats import mean_ci, paired_difference_ci

from .conftest import byte_tokenizer
from .tiny import tiny_llama

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def instruction_rows(count: int = 6) -> list[dict]:
    rows = []
    for index in range(count):
        answer = f"answer{index % 3 + 1}"
        instruction = (
            f"Question {index}: which?\n\nAnswer1: red Answer2: green Answer3: blue\n\n"
            "Answer format: answer1/answer2/answer3"
        )
        rows.append(
            {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}
        )
    return rows


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path


def test_instruction_row_file_by_path(tmp_path):
    path = write_json(tmp_path / "mine.json", instruction_rows())
    task = resolve_task(str(path))
    assert task.name == "mine" and task.spec.output_type == "multiple_choice"
    assert task.docs[0].choices == ["answer1", "answer2", "answer3"] and task.docs[4].target == "answer2"
    assert task.docs[1].row.line == 8  # `indent=1` puts each row object on its own run of lines
    generated = resolve_task(f"{path}:gen", limit=2)
    assert generated.spec.output_type == "generate_until" and len(generated.docs) == 2
    jsonl = tmp_path / "boolq" / "test.jsonl"
    jsonl.parent.mkdir()
    rows = [{"instruction": "Sky blue?\n\nAnswer format: true/false", "output": "", "answer": "true"}]
    jsonl.write_text("\n".join(json.dumps(row) for row in rows * 3))
    assert resolve_task(str(jsonl)).name == "boolq-test"


@pytest.mark.parametrize(
    ("row_change", "message"),
    [
        ({"answer": "answer9"}, r"line 8: field 'answer': gold answer 'answer9' is not one of the options"),
        ({"instruction": "Which colour?"}, r"line 8: field 'instruction': lists no options; expected options \(an"),
        ({"answer": None}, r"line 8: field 'answer': missing"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, row_change, message):
    rows = instruction_rows()
    rows[1] = {key: value for key, value in {**rows[1], **row_change}.items() if value is not None}
    path = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(EvalDataError, match=rf"bad\.json, {message}"):
        resolve_task(str(path))


def test_malformed_data_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a"}\n{"instruction": \n')
    with pytest.raises(EvalDataError, match=r"broken\.jsonl, line 2: not valid JSON"):
        resolve_task(str(broken))
    not_list = write_json(tmp_path / "object.json", {"instruction": "a"})
    with pytest.raises(EvalDataError, match=r"object\.json, line 1: expected a JSON list.*JSON Lines"):
        resolve_task(str(not_list))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        resolve_task(str(tmp_path / "missing.json"))
    with pytest.raises(EvalDataError, match="Unknown task 'nope'"):
        resolve_task("nope")


SPEC = """\
description: my task
data: rows.json
output_type: {output_type}
doc_to_choice: answer_format
doc_to_target: "{{answer}}"
answer_template: "the correct answer is {{}}"
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SPEC.format(output_type="multiple_choise"), r"spec\.yaml, line 3: field 'output_type': must be one of"),
        (SPEC.format(output_type="multiple_choice") + "few_shots: 2\n", r"line 7: field 'few_shots': unknown key"),
        (SPEC.format(output_type="multiple_choice") + "few_shot: two\n", r"line 7: field 'few_shot': expected int"),
        (SPEC.format(output_type="multiple_choice") + "metrics: [rouge_l]\n", r"line 7: field 'metrics': 'rouge_l'"),
        (SPEC.format(output_type="multiple_choice") + "  bad indent\n", r"spec\.yaml, line \d+: not valid YAML"),
        (SPEC.format(output_type="multiple_choice").replace("data: rows.json", "data: nowhere.json"),
         r"spec\.yaml, line 2: field 'data': data file .*nowhere\.json not found"),
        (SPEC.format(output_type="generate_until") + "doc_to_text: '{question}'\n",
         r"rows\.json, line 2: field 'question': missing"),
    ],
)  # fmt: skip
def test_malformed_spec_names_file_line_and_field(tmp_path, text, message):
    write_json(tmp_path / "rows.json", instruction_rows())
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises((EvalDataError, FileNotFoundError), match=message):
        resolve_task(str(tmp_path / "spec.yaml"), data_dir=tmp_path)


def test_include_overrides_and_a_new_task_is_a_few_lines(tmp_path):
    write_json(tmp_path / "rows.json", instruction_rows())
    (tmp_path / "base.yaml").write_text(SPEC.format(output_type="multiple_choice"))
    (tmp_path / "base_gen.yaml").write_text("include: base.yaml\noutput_type: generate_until\nmetrics: [acc]\n")
    task = resolve_task(str(tmp_path / "base_gen.yaml"), data_dir=tmp_path)
    assert task.name == "base_gen" and task.spec.output_type == "generate_until" and task.spec.description == "my task"


def test_every_shipped_spec_is_valid():
    assert {"boolq", "arc_easy", "openbookqa", "piqa", "gsm8k", "svamp", "mt_bench", "alpaca_heldout"} <= set(
        shipped_tasks()
    )
    for path in shipped_tasks().values():
        load_spec(path)


def test_every_shipped_spec_reads_its_data():
    # ../shared/data sits beside the repository on every build and CI machine; its absence is a failure, not a skip
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing"
    for name in shipped_tasks():
        task = resolve_task(name, SHARED_DATA, limit=3)
        assert len(task.docs) == 3 and all(doc.text for doc in task.docs)
    assert resolve_task("gsm8k", SHARED_DATA, limit=1).docs[0].target.endswith("#### 18")
    assert (
        resolve_task("alpaca_heldout", SHARED_DATA).docs[0].row.data
        == json.loads((SHARED_DATA / "instruct" / "alpaca_5000.json").read_text())[4800]
    )


def tiny_loader(system: System):
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    seed = 0 if system.adapter is None else 1  # the "adapter" system is another random model
    return tiny_llama(seed=seed, vocab_size=len(tokenizer), max_position_embeddings=512), tokenizer


def test_runner_end_to_end_on_tiny_models(tmp_path):
    path = write_json(tmp_path / "mine.json", instruction_rows(8))
    systems = make_systems(["default"], ["out/adapter"])
    settings = Settings(limit=6, batch_size=4, resamples=200, progress=False)
    tasks = [str(path), f"{path}:gen"]
    summary = run_evaluation(systems, tasks, output=tmp_path / "a", settings=settings, load=tiny_loader)
    assert [system["label"] for system in summary["systems"]] == [
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct+adapter",
    ]
    result = summary["results"]["SmolLM2-135M-Instruct"]["mine"]
    assert result["n"] == 6 and set(result["metrics"]) == {"acc", "acc_norm"}
    assert summary["tasks"]["mine"]["majority_rate"] == pytest.approx(2 / 6)
    assert [(c["task"], c["metric"]) for c in summary["comparisons"]] == [("mine", "acc"), ("mine_gen", "acc")]
    records = [json.loads(line) for line in (tmp_path / "a" / "SmolLM2-135M-Instruct" / "mine.jsonl").open()]
    assert len(records) == 6 and {"prompt", "prediction", "gold", "score", "loglik", "source"} <= set(records[0])
    assert records[0]["source"].endswith("mine.json, line 2")
    assert {"prompt", "reply", "prediction", "gold", "score"} <= set(
        json.loads((tmp_path / "a" / "SmolLM2-135M-Instruct+adapter" / "mine_gen.jsonl").open().readline())
    )
    markdown = (tmp_path / "a" / "summary.md").read_text()
    # every metric, not only the JSON
    assert "| mine | 6 | acc |" in markdown and "| mine | 6 | acc_norm |" in markdown
    assert (tmp_path / "a" / "comparison.png").stat().st_size > 1000
    # deterministic: the same command gives the same numbers
    again = run_evaluation(systems, tasks, output=tmp_path / "b", settings=settings, load=tiny_loader)
    assert _without_seconds(again) == _without_seconds(summary)


def _without_seconds(summary: dict) -> dict:
    return {
        label: {task: {k: v for k, v in result.items() if k != "seconds"} for task, result in tasks.items()}
        for label, tasks in summary["results"].items()
    } | {"comparisons": summary["comparisons"]}


def test_bootstrap_is_seeded_and_paired():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    assert mean_ci(values, seed=3) == mean_ci(values, seed=3)
    mean, low, high = mean_ci(values)
    assert mean == 0.7 and 0.3 <= low < mean < high <= 1.0
    # the same gain on every example: the paired interval is a point, however noisy the scores themselves are
    assert paired_difference_ci([v + 0.1 for v in values], values) == pytest.approx((0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="same examples"):
        paired_difference_ci([1, 0], [1])
