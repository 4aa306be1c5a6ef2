"""Task specs: small YAML files that say which data to read, how to build the prompt, and how to score the answer.

A spec (the shipped ones are in `pock_eval/tasks/*.yaml`; a new one is a few lines):

    name: boolq                                # default: the file name
    description: BoolQ, LLM-Adapters instruction form
    data: commonsense/boolq/test.json          # or a list; relative to the data dir (--data-dir / $POCK_EVAL_DATA)
    fewshot_data: commonsense/boolq/train.json # rows few-shot examples are drawn from (default: the other test rows)
    output_type: multiple_choice               # multiple_choice | generate_until | reference | pairwise
    doc_to_choice: answer_format               # the options: `auto`, `answer_format`, a list, or a list field
    doc_to_target: "{answer}"                  # the gold answer (a template over the row's fields)
    answer_template: "the correct answer is {}"  # how the model should say an answer

Instead of `data`, `hub: {path: ..., name: ..., split: ...}` reads a data set through `datasets.load_dataset`.
`include: other.yaml` starts from another spec (relative to this one) and overrides its keys. Every key is listed
in `FIELDS` with its meaning. Templates are Python format strings over a row's fields (`{question}`,
`{turns[0]}`); without `doc_to_text`, a row's prompt is its `instruction`, plus a blank line and its `input` when that
is not empty: the convention `pock_hf.data` trains with.

A data file needs no spec: `data_file_spec` reads its rows and scores them as multiple choice (options listed in any
layout of `pock_eval.layouts`), maths (a numeric `answer`) or free text (a reference `output`); a `:mc`, `:gen`,
`:math` or `:text` suffix on its path forces the kind.

Every problem is an `EvalDataError` (a `ValueError`) whose message names the file, the line and the field.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from . import layouts
from .datafiles import EvalDataError, Row, read_rows
from .extract import extract_number

OUTPUT_TYPES = ("multiple_choice", "generate_until", "reference", "pairwise")
ANSWER_TYPES = ("choice", "yes_no", "number", "text")
METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("acc",),
    "reference": ("rouge_l", "token_f1", "exact_match"),
    "pairwise": ("win_rate",),
}
DATA_ENV = "POCK_EVAL_DATA"
CHOICE_ANSWER = "the correct answer is {}"  # how the LLM-Adapters rows' `output` says an option
# The spec of a data file scored as each kind (`name.json:<kind>` forces one; `gen` is the generated-answer form of
# `mc`): what `data_file_spec` fills in besides the data, the name and the gold field.
DATA_FILE_KINDS: dict[str, dict] = {
    "mc": {
        "description": "multiple choice, log-likelihood of each option",
        "output_type": "multiple_choice",
        "doc_to_choice": "auto",
        "answer_type": "choice",
        "answer_template": CHOICE_ANSWER,
        "metrics": ["acc", "acc_norm"],
    },
    "gen": {
        "description": "multiple choice, the option a generated reply names",
        "output_type": "generate_until",
        "doc_to_choice": "auto",
        "answer_type": "choice",
        "answer_template": CHOICE_ANSWER,
        "metrics": ["acc"],
        "max_new_tokens": 32,
    },
    "math": {
        "description": "the final number of a generated solution",
        "output_type": "generate_until",
        "answer_type": "number",
        "metrics": ["acc"],
        "max_new_tokens": 256,
    },
    "text": {
        "description": "a generated answer against the reference, ROUGE-L and token F1",
        "output_type": "reference",
        "answer_type": "text",
        "metrics": ["rouge_l", "token_f1"],
        "max_new_tokens": 128,
    },
}

# key -> (accepted Python types, meaning). The spec schema in one place: validation and `--help` read it.
FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "task name (default: the spec's file name)"),
    "description": ((str,), "one line for reports"),
    "version": ((int,), "bump when the prompt or scoring changes, so old numbers are not compared with new ones"),
    "include": ((str,), "another spec file (relative to this one) whose keys this one overrides"),
    "data": ((str, list), "data file(s), JSON list or JSON Lines, relative to the data dir"),
    "hub": ((dict,), "instead of `data`: {path, name, split} for datasets.load_dataset"),
    "rows": ((list,), "[start, end] slice of the rows (either may be null), e.g. held-out rows"),
    "fewshot_data": ((str, list), "file(s) few-shot examples are drawn from (default: the other evaluated rows)"),
    "output_type": ((str,), f"one of {OUTPUT_TYPES}"),
    "doc_to_text": (
        (str,),
        "the prompt, a template over row fields (default: instruction [+ blank line + input], or the question field)",
    ),
    "doc_to_target": ((str,), "the gold answer or reference text, a template over row fields"),
    "doc_to_choice": (
        (str, list),
        (
            "`auto` (the options in any layout pock_eval.layouts reads), `answer_format` (the row's 'Answer format: "
            "a/b' line), a list, or a field name"
        ),
    ),
    "answer_template": (
        (str,),
        (
            "how an answer is said, `{}` standing for it: the scored continuation of a "
            "multiple-choice option and the reply of a few-shot example"
        ),
    ),
    "answer_type": ((str,), f"how a generated answer is extracted, one of {ANSWER_TYPES}"),
    "tolerance": ((int, float), "absolute tolerance of numeric answers"),
    "chat_template": ((bool,), "render the prompt with the tokenizer's chat template (default true)"),
    "system_prompt": ((str, type(None)), "system message (default: none; the template's own default applies)"),
    "few_shot": ((int,), "number of solved examples before the question"),
    "metrics": (
        (list,),
        "metric names, the first is the headline; by output type: "
        + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in METRICS.items()),
    ),
    "generation": ((dict,), "{max_new_tokens: int, stop: [str, ...]} for generated answers (greedy)"),
}
GENERATION_KEYS = {"max_new_tokens": int, "stop": list}


@dataclass
class TaskSpec:
    """A validated task spec. `origin` maps each key to the `"file, line N"` it was set on, for error messages."""

    name: str
    source: str
    output_type: str
    data: list[str] = field(default_factory=list)
    hub: dict | None = None
    rows: tuple[int | None, int | None] | None = None
    fewshot_data: list[str] = field(default_factory=list)
    doc_to_text: str | None = None
    doc_to_target: str | None = None
    doc_to_choice: str | list[str] | None = None
    answer_template: str = "{}"
    answer_type: str = "text"
    tolerance: float = 1e-4
    chat_template: bool = True
    system_prompt: str | None = None
    few_shot: int = 0
    metrics: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    version: int = 0
    description: str = ""
    origin: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        return self.origin.get(key, self.source)


@dataclass
class Doc:
    """One evaluation example: the prompt body, the gold answer (a string, None for pairwise without references),
    the options of a choice task, and the row it came from."""

    index: int
    text: str
    target: str | None
    choices: list[str] | None
    row: Row


@dataclass
class Task:
    """A spec with its rows read: `docs` are evaluated, `fewshot_docs` supply few-shot examples (may be empty)."""

    spec: TaskSpec
    docs: list[Doc]
    fewshot_docs: list[Doc]

    @property
    def name(self) -> str:
        return self.spec.name


# --- finding and reading specs -------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """`$POCK_EVAL_DATA`, else `../shared/data` relative to the working directory."""
    return Path(os.environ.get(DATA_ENV) or Path("..") / "shared" / "data")


def shipped_tasks() -> dict[str, Path]:
    """Shipped task names -> their spec files."""
    folder = resources.files("pock_eval") / "tasks"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> Task:
    """The task named by `name`: a shipped task name, a spec file (`.yaml`), or a data file (`.json`/`.jsonl`, scored
    as its rows show; append `:mc`, `:gen`, `:math` or `:text` to force a kind, see `data_file_spec`).

    `limit` keeps the first N rows (after the spec's `rows` slice).

    Raises:
        FileNotFoundError: a spec or data file does not exist (the message says which spec line points to it).
        EvalDataError: unknown name, malformed spec or data; the message names the file, line and field.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    base, _, kind = name.rpartition(":")
    if kind not in DATA_FILE_KINDS:
        base, kind = name, None
    if base.endswith((".json", ".jsonl")):
        return build_task(data_file_spec(base, kind), Path("."), limit=limit)
    if kind is not None:
        raise EvalDataError(
            f"Task {name!r}: a ':{kind}' suffix chooses how a data file (.json/.jsonl) is scored; a shipped task or "
            "spec states it in its spec (e.g. boolq_gen)."
        )
    if base.endswith((".yaml", ".yml")):
        spec = load_spec(base)
    elif base in shipped_tasks():
        spec = load_spec(shipped_tasks()[base])
    else:
        raise EvalDataError(
            f"Unknown task {name!r}: give a shipped task ({', '.join(sorted(shipped_tasks()))}), a spec file (.yaml) "
            "or a data file (.json/.jsonl)."
        )
    return build_task(spec, data_dir, limit=limit)


def load_spec(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> TaskSpec:
    """Read and validate a spec file, following `include:`.

    Raises:
        FileNotFoundError: the file (or an included one) does not exist.
        EvalDataError: not YAML, not a mapping, an unknown key, a value of the wrong type, an include cycle.
    """
    raw, origin = _read_yaml(Path(path), _seen)
    spec = TaskSpec(name=raw.pop("name", Path(path).stem), source=str(path), output_type="", origin=origin)
    return _validate(spec, raw)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    """The spec mapping of `path` merged over its includes, and the `"file, line N"` each key was set on."""
    if not path.is_file():
        raise FileNotFoundError(f"Task spec not found: {path}")
    if path.resolve() in seen:
        raise EvalDataError(f"{path}: include cycle through {' -> '.join(str(p) for p in seen)}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise EvalDataError(f"{path}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict) or not isinstance(node, yaml.MappingNode):
        raise EvalDataError(f"{path}, line 1: a task spec must be a YAML mapping of keys to values")
    origin = {key.value: f"{path}, line {key.start_mark.line + 1}" for key, _ in node.value}
    for key in raw:
        if key not in FIELDS:
            raise EvalDataError(
                f"{origin.get(key, path)}: field {key!r}: unknown key; valid keys: {', '.join(FIELDS)}"
            )
        types, meaning = FIELDS[key]
        if not isinstance(raw[key], types) or (isinstance(raw[key], bool) and bool not in types):
            raise EvalDataError(
                f"{origin[key]}: field {key!r}: expected {' or '.join(t.__name__ for t in types)} ({meaning}), "
                f"got {raw[key]!r}"
            )
    if "include" in raw:
        parent, parent_origin = _read_yaml(path.parent / raw.pop("include"), (*seen, path.resolve()))
        parent.pop("name", None)  # a variant is a new task: it gets its own file's name unless it sets one
        raw, origin = {**parent, **raw}, {**parent_origin, **origin}
    return raw, origin


def _validate(spec: TaskSpec, raw: dict) -> TaskSpec:
    """Fill `spec` from the merged mapping, checking what types alone cannot."""

    def fail(key: str, problem: str) -> EvalDataError:
        return EvalDataError(f"{spec.where(key)}: field {key!r}: {problem}")

    if raw.get("output_type") not in OUTPUT_TYPES:
        raise fail("output_type", f"must be one of {OUTPUT_TYPES}, got {raw.get('output_type')!r}")
    spec.output_type = raw["output_type"]
    if ("data" in raw) == ("hub" in raw):
        raise fail("data", "give exactly one of 'data' (files) and 'hub' (a datasets hub id)")
    spec.data = _as_list(raw.get("data", []))
    spec.fewshot_data = _as_list(raw.get("fewshot_data", []))
    if "hub" in raw:
        hub = raw["hub"]
        if not isinstance(hub.get("path"), str) or set(hub) - {"path", "name", "split"}:
            raise fail("hub", f"expected {{path: str, name: str (optional), split: str}}, got {hub!r}")
        spec.hub = {"split": "test", **hub}
    if "rows" in raw:
        rows = raw["rows"]
        if len(rows) != 2 or not all(bound is None or isinstance(bound, int) for bound in rows):
            raise fail("rows", f"expected [start, end] (integers or null), got {rows!r}")
        spec.rows = (rows[0], rows[1])
    for key in ("description", "version", "doc_to_text", "doc_to_target", "doc_to_choice", "answer_template"):
        if key in raw:
            setattr(spec, key, raw[key])
    for key in ("chat_template", "system_prompt", "few_shot"):
        if key in raw:
            setattr(spec, key, raw[key])
    if spec.few_shot < 0:
        raise fail("few_shot", f"must be >= 0, got {spec.few_shot}")
    if "{}" not in spec.answer_template:
        raise fail("answer_template", f"must contain '{{}}' where the answer goes, got {spec.answer_template!r}")
    if "tolerance" in raw:
        spec.tolerance = float(raw["tolerance"])
    default_answer = "choice" if spec.doc_to_choice is not None else "text"
    spec.answer_type = raw.get("answer_type", default_answer)
    if spec.answer_type not in ANSWER_TYPES:
        raise fail("answer_type", f"must be one of {ANSWER_TYPES}, got {spec.answer_type!r}")
    if spec.output_type == "multiple_choice" and spec.doc_to_choice is None:
        raise fail("output_type", "multiple_choice needs 'doc_to_choice' (the options to score)")
    if spec.output_type != "pairwise" and spec.doc_to_target is None:
        raise fail("output_type", f"{spec.output_type} needs 'doc_to_target' (the gold answer)")
    if spec.answer_type == "choice" and spec.doc_to_choice is None and spec.output_type == "generate_until":
        raise fail("answer_type", "'choice' answers need 'doc_to_choice'")
    valid = METRICS[spec.output_type]
    spec.metrics = raw.get("metrics", list(valid))
    for metric in spec.metrics:
        if metric not in valid:
            raise fail("metrics", f"{metric!r} is not a metric of {spec.output_type} tasks; valid: {valid}")
    generation = raw.get("generation", {})
    for key, value in generation.items():
        if key not in GENERATION_KEYS or not isinstance(value, GENERATION_KEYS[key]):
            raise fail("generation", f"{key}: {value!r} is not valid; expected {{max_new_tokens: int, stop: [str]}}")
    spec.max_new_tokens = generation.get("max_new_tokens", spec.max_new_tokens)
    spec.stop = [str(stop) for stop in generation.get("stop", [])]
    return spec


def _as_list(value: str | list) -> list[str]:
    return [value] if isinstance(value, str) else [str(item) for item in value]


def data_file_spec(path: str | os.PathLike, kind: str | None = None) -> TaskSpec:
    """The spec of a data file: its rows are scored as the kind of `pock_eval.layouts.KINDS` they fit (`mc`, `math` or
    `text`), or as `kind` when given (`gen`: the generated-answer form of a multiple-choice file; on other files the
    same as theirs). Spoken answers follow the LLM-Adapters rows: `the correct answer is X`.

    Raises:
        EvalDataError: no row fits any kind (names the first row and what was expected); malformed JSON.
    """
    path = Path(path)
    rows = read_rows(path)  # read again by `build_task`, the one path from any spec to docs (small files: cheap)
    data = [row.data for row in rows]
    scoring = kind
    if kind in (None, "gen"):
        inferred = layouts.infer_kind(data)
        if inferred is None:
            raise EvalDataError(
                f"{rows[0].where}: cannot tell how to score this row: expected {layouts.DESCRIBE}; fields present: "
                f"{sorted(rows[0].data)}. Force a kind with :mc, :math or :text, or write a task spec."
            )
        scoring = "gen" if kind == "gen" and inferred == "mc" else inferred
    # the gold field: rows that lack it get an error naming them when their docs are made
    if scoring == "text":
        present = {layouts.reference_field(row) for row in data}
        gold = next((name for name in layouts.REFERENCE_FIELDS if name in present), "output")
    elif scoring == "math":
        gold = "answer"
    else:
        gold = next((name for name in layouts.GOLD_FIELDS if any(name in row for row in data)), "answer")
    # `boolq/test.json` -> "boolq-test": a bare split name would not tell two files apart in a report
    name = f"{path.parent.name}-{path.stem}" if path.stem in ("test", "train", "dev", "validation") else path.stem
    fields = dict(DATA_FILE_KINDS[scoring])
    how = f"forced by :{kind}" if kind else "inferred from the rows"
    return TaskSpec(
        name=name + (f"_{kind}" if kind else ""),  # the suffix asked for: `rows.json` and `rows.json:gen` both run
        source=str(path),
        data=[str(path)],
        doc_to_target=f"{{{gold}}}",
        description=f"{path.name}: {fields.pop('description')} ({how})",
        **fields,
    )


# --- rows -> docs --------------------------------------------------------------------------------------------------


def build_task(spec: TaskSpec, data_dir: str | os.PathLike, *, limit: int | None = None) -> Task:
    """Read the spec's rows and turn each into a `Doc`, validating every field the spec uses.

    Raises:
        FileNotFoundError: a data file is missing (the message names the spec line and the data dir).
        EvalDataError: a row lacks a field, or its gold answer is not one of its options.
    """
    rows = _read_data(spec, spec.data, "data", data_dir)
    if spec.rows is not None:
        rows = rows[slice(*spec.rows)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise EvalDataError(f"{spec.where('rows')}: field 'rows': selects no rows")
    fewshot = _read_data(spec, spec.fewshot_data, "fewshot_data", data_dir) if spec.fewshot_data else []
    docs = [make_doc(spec, row, index) for index, row in enumerate(rows)]
    fewshot_docs = [make_doc(spec, row, index) for index, row in enumerate(fewshot)] if spec.few_shot else []
    if spec.few_shot and len(fewshot_docs or docs) <= spec.few_shot:
        raise EvalDataError(f"{spec.where('few_shot')}: field 'few_shot': {spec.few_shot} shots but too few rows")
    return Task(spec, docs, fewshot_docs)


def _read_data(spec: TaskSpec, files: list[str], key: str, data_dir: str | os.PathLike) -> list[Row]:
    if key == "data" and spec.hub is not None:
        return _read_hub(spec.hub)
    rows: list[Row] = []
    for name in files:
        path = Path(name) if Path(name).is_absolute() else Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{spec.where(key)}: field {key!r}: data file {path} not found (data dir {data_dir}; set --data-dir "
                f"or ${DATA_ENV})"
            )
        rows += read_rows(path)
    return rows


def _read_hub(hub: dict) -> list[Row]:
    from datasets import load_dataset

    dataset = load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    source = f"{hub['path']}[{hub['split']}]"
    return [Row(row, f"{source} row {index}", None) for index, row in enumerate(dataset)]


def make_doc(spec: TaskSpec, row: Row, index: int) -> Doc:
    """The `Doc` of one row under `spec`.

    Raises:
        EvalDataError: the row has no prompt, a field the templates use is missing or empty, it lists no options for
            a choice task or its gold answer is not one of them, or the gold answer of a numeric task holds no
            number; the message names file, line and field.
    """
    prompt_field, text = _prompt(spec, row)
    target = _fill(spec.doc_to_target, row) if spec.doc_to_target is not None else None
    gold_field = _template_fields(spec.doc_to_target)[0] if spec.doc_to_target else "answer"
    choices = None
    if spec.doc_to_choice == "auto":
        options = layouts.find_options(row.data, text)
        if options is None:
            raise row.error(prompt_field, f"lists no options; expected {layouts.OPTION_LAYOUTS}")
        resolved = layouts.gold_choice(options, target)
        if resolved is None:
            texts = f" or their texts {options.texts}" if options.texts else ""
            raise row.error(gold_field, f"gold answer {target!r} is not one of the options {options.labels}{texts}")
        choices, target = resolved
        if options.layout == "field":  # the model must see options that only a field lists
            text = f"{text}\n\n{layouts.listed(options)}"
    elif spec.doc_to_choice is not None:
        choices = _choices(spec.doc_to_choice, row, prompt_field, text)
        if spec.answer_type == "choice" and target not in choices:
            raise row.error(gold_field, f"gold answer {target!r} is not one of the options {choices}")
    if spec.answer_type == "number" and target is not None and extract_number(target) is None:
        raise row.error(gold_field, f"expected a number (the gold answer of a numeric task), got {target!r}")
    return Doc(index=index, text=text, target=target, choices=choices, row=row)


def _prompt(spec: TaskSpec, row: Row) -> tuple[str, str]:
    """`(field, text)`: the row's prompt and the field errors about it name."""
    if spec.doc_to_text is not None:
        names = _template_fields(spec.doc_to_text)
        return (names[0] if names else "doc_to_text"), _fill(spec.doc_to_text, row)
    prompt = layouts.prompt_of(row.data)
    if prompt is None:
        expected = ", ".join(repr(name) for name in layouts.PROMPT_FIELDS)
        raise row.error(
            "instruction", f"missing: the prompt is the first of {expected} (fields present: {sorted(row.data)})"
        )
    return prompt


def _template_fields(template: str) -> list[str]:
    """Top-level field names a format template reads (`{turns[0]}` reads `turns`)."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return [re.split(r"[.\[]", name, maxsplit=1)[0] for name in names]


def _fill(template: str, row: Row) -> str:
    for name in _template_fields(template):
        if name not in row.data:
            raise row.error(name, f"missing (used by the template {template!r}; fields present: {sorted(row.data)})")
    try:
        return template.format_map(row.data)
    except (IndexError, KeyError, TypeError, AttributeError) as error:
        raise row.error(_template_fields(template)[0], f"cannot fill the template {template!r}: {error!r}") from None


def _choices(rule: str | list, row: Row, prompt_field: str, text: str) -> list[str]:
    if isinstance(rule, list):
        return [str(choice) for choice in rule]
    if rule == "answer_format":
        labels = layouts.answer_format_labels(text)
        if labels is None:
            raise row.error(prompt_field, "has no 'Answer format: a/b/...' line listing the options")
        return labels
    value = row.data.get(rule)
    if not isinstance(value, list) or not value:
        raise row.error(rule, f"must be a non-empty list of options, got {value!r}")
    return [str(choice) for choice in value]
