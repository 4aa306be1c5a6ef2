"""Running tasks on systems: per-example records, metrics with confidence intervals, comparisons with the baseline.

    summary = run_evaluation([System("base"), System("tuned", adapter="out/adapter")], ["boolq", "arc_easy"],
                             output="runs/eval", limit=500)

The first system is the baseline: every other system gets, per task, the paired difference of its headline metric
(the spec's first metric) with a bootstrap confidence interval, and pairwise tasks are judged against it (a single
system is judged against the data's reference answers). Everything is deterministic for a given seed: greedy
decoding, seeded few-shot draws, seeded bootstrap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pock_hf.io.files import atomic_write_text

from .extract import extract_answer, is_correct
from .generate import generate_until
from .judge import Judge, judge_pairs
from .models import System, load_system
from .prompts import render_prompt, select_shots
from .scoring import loglikelihood
from .spec import Doc, Task, resolve_task
from .stats import majority_rate, mean_ci, paired_difference_ci
from .text_metrics import REFERENCE_METRICS

logger = logging.getLogger(__name__)

REFERENCE_LABEL = "reference answers"


@dataclass
class Settings:
    """How to run: `limit` first rows per task, `batch_size` prompts per forward pass, `seed` for few-shot draws and the
    bootstrap, `resamples` of the bootstrap, `device` / `dtype` of the models."""

    limit: int | None = None
    batch_size: int = 8
    seed: int = 0
    resamples: int = 1000
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True


def evaluate_task(model, tokenizer, task: Task, settings: Settings) -> list[dict]:
    """Per-example records `{index, source, prompt, prediction, gold, score: {metric: value}}` (plus `choices` and
    `loglik` for multiple choice, `reply` for generated answers). Pairwise tasks get their scores when judged."""
    spec = task.spec
    prompts = [render_prompt(task, doc, tokenizer, select_shots(task, doc, settings.seed)) for doc in task.docs]
    plain = not spec.chat_template  # plain-text prompts get the tokenizer's BOS; chat templates write their own
    records = [
        {"index": doc.index, "source": doc.row.where, "prompt": prompt, "gold": doc.target}
        for doc, prompt in zip(task.docs, prompts)
    ]
    common = {"add_special_tokens": plain, "batch_size": settings.batch_size, "progress": settings.progress}
    if spec.output_type == "multiple_choice":
        requests = [
            (prompt, spec.answer_template.format(choice))
            for doc, prompt in zip(task.docs, prompts)
            for choice in doc.choices
        ]
        scores = iter(loglikelihood(model, tokenizer, requests, **common))
        for doc, record in zip(task.docs, records):
            loglik = [next(scores)[0] for _ in doc.choices]
            # length-normalised: per character of the option's text (lm-evaluation-harness's acc_norm)
            normalised = [value / len(spec.answer_template.format(c)) for value, c in zip(loglik, doc.choices)]
            best, best_norm = _argmax(loglik), _argmax(normalised)
            record |= {"choices": doc.choices, "loglik": loglik, "prediction": doc.choices[best]}
            record["score"] = {
                "acc": float(doc.choices[best] == doc.target),
                "acc_norm": float(doc.choices[best_norm] == doc.target),
            }
        return records
    replies = generate_until(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, stop=spec.stop, **common)
    for doc, record, reply in zip(task.docs, records, replies):
        if spec.output_type == "generate_until":
            prediction = extract_answer(reply, spec.answer_type, doc.choices)
            record |= {"reply": reply, "prediction": prediction}
            record["score"] = {"acc": float(is_correct(prediction, doc.target, spec.answer_type, spec.tolerance))}
        elif spec.output_type == "reference":
            record |= {
                "prediction": reply,
                "score": {m: REFERENCE_METRICS[m](reply, doc.target) for m in spec.metrics},
            }
        else:  # pairwise
            record |= {"prediction": reply, "score": {}}
    return records


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equal values: deterministic


def summarize(records: list[dict], metrics: Sequence[str], settings: Settings) -> dict:
    """`{metric: {value, ci_low, ci_high}}` over the records that have the metric, plus `n` and `missing` (records
    without a score, e.g. pairs the judge failed on)."""
    summary: dict = {"n": len(records), "missing": 0, "metrics": {}}
    for metric in metrics:
        values = [record["score"][metric] for record in records if record["score"].get(metric) is not None]
        summary["missing"] = max(summary["missing"], len(records) - len(values))
        value, low, high = mean_ci(values, resamples=settings.resamples, seed=settings.seed)
        summary["metrics"][metric] = {"value": value, "ci_low": low, "ci_high": high}
    return summary


def run_evaluation(
    systems: Sequence[System],
    task_names: Sequence[str],
    *,
    output: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    settings: Settings | None = None,
    make_judge: Callable[[], Judge] | None = None,
    load: Callable[[System], tuple] | None = None,
) -> dict:
    """Evaluate every system on every task; write `<output>/<system>/<task>.jsonl`, `summary.json`, `summary.md` and
    `comparison.png`; return the summary.

    All task specs and data are read and validated before any model loads. Pairwise tasks need `make_judge`, called
    once after the systems are unloaded (a local judge model then never shares memory with them). `load` replaces `models.load_system` (tests
    pass tiny models).

    Raises:
        ValueError: no systems, duplicate task names, or a pairwise task without a judge (and spec/data errors from
            `resolve_task`).
    """
    settings = settings or Settings()
    output = Path(output)
    if not systems:
        raise ValueError("Give at least one system (model, or model + adapter) to evaluate.")
    tasks = resolve_tasks(task_names, data_dir, limit=settings.limit)
    if make_judge is None and any(task.spec.output_type == "pairwise" for task in tasks):
        raise ValueError("Pairwise tasks need a judge (--judge URL or model).")
    load = load or (lambda system: load_system(system, device=settings.device, dtype=settings.dtype))

    records: dict[str, dict[str, list[dict]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for system in systems:
        torch.manual_seed(settings.seed)
        model, tokenizer = load(system)
        records[system.label], seconds[system.label] = {}, {}
        for task in tasks:
            logger.info("%s: %s (%d examples)", system.label, task.name, len(task.docs))
            started = time.perf_counter()
            records[system.label][task.name] = evaluate_task(model, tokenizer, task, settings)
            seconds[system.label][task.name] = time.perf_counter() - started
            write_records(output, system.label, task.name, records[system.label][task.name])
        del model

    pairwise = []
    if any(task.spec.output_type == "pairwise" for task in tasks):
        pairwise = _judge_all(make_judge(), systems, tasks, records, settings, output)
    summary = summarize_run(systems, tasks, records, seconds, settings, data_dir=data_dir, pairwise=pairwise)
    write_summary(summary, output)
    return summary


def resolve_tasks(
    task_names: Sequence[str], data_dir: str | os.PathLike | None = None, *, limit: int | None = None
) -> list[Task]:
    """Every named task, specs and data read and validated (see `spec.resolve_task`).

    Raises:
        ValueError: two tasks have the same name (and spec/data errors from `resolve_task`).
    """
    tasks = [resolve_task(name, data_dir, limit=limit) for name in task_names]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"Two tasks have the same name: {names}; give each once.")
    return tasks


def summarize_run(
    systems: Sequence[System],
    tasks: Sequence[Task],
    records: dict[str, dict[str, list[dict]]],
    seconds: dict[str, dict[str, float]],
    settings: Settings,
    *,
    data_dir: str | os.PathLike | None = None,
    pairwise: list[dict] | None = None,
) -> dict:
    """The summary that `summary.json` holds, from each system's per-task records (`records[label][task]`) and
    seconds: metrics with CIs per system and task, each later system's paired difference from the first, the
    judged win rates `pairwise`."""
    results = {
        system.label: {
            task.name: summarize(records[system.label][task.name], task.spec.metrics, settings)
            | {"seconds": seconds[system.label][task.name]}
            for task in tasks
        }
        for system in systems
    }
    summary = {
        "settings": {
            "limit": settings.limit,
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "device": settings.device,
            "dtype": settings.dtype,
            "bootstrap_resamples": settings.resamples,
            "data_dir": str(data_dir) if data_dir is not None else None,
        },
        "systems": [vars(system) for system in systems],
        "tasks": {task.name: _task_info(task) for task in tasks},
        "results": results,
        "comparisons": _compare(systems, tasks, records, settings),
        "pairwise": pairwise or [],
    }
    return summary


def write_summary(summary: dict, output: str | os.PathLike) -> None:
    """`summary.json`, `summary.md` and `comparison.png` in `output`."""
    from .report import plot_comparison, write_markdown

    output = Path(output)
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, output / "summary.md")
    plot_comparison(summary, output / "comparison.png")


def _task_info(task: Task) -> dict:
    spec = task.spec
    labels = [_gold_class(doc) for doc in task.docs if doc.target is not None]
    has_labels = spec.answer_type in ("choice", "yes_no") and spec.output_type in ("multiple_choice", "generate_until")
    return {
        "source": spec.source,
        "version": spec.version,
        "output_type": spec.output_type,
        "metrics": spec.metrics,
        "n": len(task.docs),
        # the accuracy of always giving the most common answer: an accuracy near it means no skill
        "majority_rate": majority_rate(labels) if has_labels else None,
    }


def _gold_class(doc: Doc) -> str:
    """The class the majority rate counts: the gold option's position among the options (options scored by their text
    differ from row to row, their positions do not), else the gold label."""
    if doc.choices and doc.target in doc.choices:
        return str(doc.choices.index(doc.target))
    return doc.target.lower()


def _compare(systems: Sequence[System], tasks: Sequence[Task], records: dict, settings: Settings) -> list[dict]:
    """Each non-baseline system minus the baseline, per task, on the headline metric (paired bootstrap CI)."""
    comparisons = []
    baseline = systems[0].label
    for system in systems[1:]:
        for task in tasks:
            if task.spec.output_type == "pairwise":
                continue  # the win rate is already a comparison with the baseline
            metric = task.spec.metrics[0]
            after = [record["score"][metric] for record in records[system.label][task.name]]
            before = [record["score"][metric] for record in records[baseline][task.name]]
            difference, low, high = paired_difference_ci(
                after, before, resamples=settings.resamples, seed=settings.seed
            )
            comparisons.append(
                {
                    "task": task.name,
                    "metric": metric,
                    "baseline": baseline,
                    "system": system.label,
                    "difference": difference,
                    "ci_low": low,
                    "ci_high": high,
                    "significant": not (low <= 0 <= high),
                }
            )
    return comparisons


def _judge_all(judge: Judge, systems, tasks, records, settings: Settings, output: Path) -> list[dict]:
    """Judge every pairwise task's answers against the baseline's (or the references, for a single system); fill the
    records' `win_rate` scores (None when missing) and rewrite their files."""
    results = []
    for task in tasks:
        if task.spec.output_type != "pairwise":
            continue
        questions = [doc.text for doc in task.docs]
        if len(systems) > 1:
            baseline, baseline_answers = (
                systems[0].label,
                [r["prediction"] for r in records[systems[0].label][task.name]],
            )
            contenders = systems[1:]
        elif all(doc.target is not None for doc in task.docs):
            baseline, baseline_answers, contenders = REFERENCE_LABEL, [doc.target for doc in task.docs], systems
        else:
            raise ValueError(f"Task {task.name!r}: judging one system needs reference answers (doc_to_target).")
        for system in contenders:
            task_records = records[system.label][task.name]
            answers = [record["prediction"] for record in task_records]
            outcomes = judge_pairs(judge, questions, answers, baseline_answers)
            for record, outcome, baseline_answer in zip(task_records, outcomes, baseline_answers):
                record["score"] = {"win_rate": outcome.score}
                record["judge"] = {
                    "baseline_answer": baseline_answer,
                    "verdict_system_first": outcome.verdict_system_first,
                    "verdict_baseline_first": outcome.verdict_baseline_first,
                    "missing_reason": outcome.missing_reason,
                }
            write_records(output, system.label, task.name, task_records)
            scores = [outcome.score for outcome in outcomes]
            valid = [score for score in scores if score is not None]
            value, low, high = mean_ci(valid, resamples=settings.resamples, seed=settings.seed)
            results.append(
                {
                    "task": task.name,
                    "judge": judge.name,
                    "baseline": baseline,
                    "system": system.label,
                    "win_rate": value,
                    "ci_low": low,
                    "ci_high": high,
                    "wins": valid.count(1.0),
                    "losses": valid.count(0.0),
                    "ties": valid.count(0.5),
                    "missing": len(scores) - len(valid),
                }
            )
    return results


def slug(label: str) -> str:
    """A file-name-safe form of a system label."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", label).strip("_") or "system"


def write_records(output: str | os.PathLike, label: str, task: str, records: list[dict]) -> None:
    """`<output>/<system>/<task>.jsonl`: one record per line."""
    output = Path(output)
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(output / slug(label) / f"{slug(task)}.jsonl", lines)
