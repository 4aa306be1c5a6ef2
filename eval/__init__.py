"""pock_eval: the evaluation harness of pock_hf (the repository's `eval/` folder).

Task specs are YAML (`pock_eval/tasks/*.yaml`); any data file works by path, scored as its rows show (see
`pock_eval.layouts`). Scoring modes:
multiple choice by log-likelihood, generation with answer extraction, open-ended answers against a reference
(ROUGE-L, token F1) and pairwise judging. `pock-eval --help` shows the command; `run_evaluation` is the same in Python.
"""

from .datafiles import EvalDataError
from .models import System, load_system, make_systems
from .runner import Settings, evaluate_task, run_evaluation, summarize
from .spec import Task, TaskSpec, load_spec, resolve_task, shipped_tasks

__all__ = [
    "EvalDataError",
    "Settings",
    "System",
    "Task",
    "TaskSpec",
    "evaluate_task",
    "load_spec",
    "load_system",
    "make_systems",
    "resolve_task",
    "run_evaluation",
    "shipped_tasks",
    "summarize",
]
