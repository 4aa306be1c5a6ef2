"""Building the model's input for one example: few-shot examples, system prompt, chat template or plain text."""

from __future__ import annotations

import random

from .spec import Doc, Task


def select_shots(task: Task, doc: Doc, seed: int) -> list[Doc]:
    """`task.spec.few_shot` solved examples for `doc`: drawn from `fewshot_docs`, or from the other evaluated docs when
    the spec names no few-shot data. The draw depends only on the seed, task name and doc index (deterministic, and
    the same for every system compared)."""
    count = task.spec.few_shot
    if not count:
        return []
    pool = task.fewshot_docs or [other for other in task.docs if other.index != doc.index]
    return random.Random(f"{seed}:{task.name}:{doc.index}").sample(pool, count)


def render_prompt(task: Task, doc: Doc, tokenizer, shots: list[Doc]) -> str:
    """The text the model continues. With `chat_template`, the shots are earlier user/assistant turns and the prompt
    ends with the template's assistant header; without, blocks of `question\\nanswer` separated by blank lines, ending
    with the question and a newline.

    Raises:
        ValueError: the spec asks for the chat template and the tokenizer has none.
    """
    spec = task.spec
    say = spec.answer_template.format
    if not spec.chat_template:
        blocks = [f"{shot.text}\n{say(shot.target)}" for shot in shots] + [f"{doc.text}\n"]
        return "\n\n".join(blocks)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"Task {task.name!r} ({spec.source}) uses the chat template, but tokenizer {tokenizer.name_or_path!r} has "
            "none; set `chat_template: false` in the spec or use a chat model."
        )
    messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt is not None else []
    for shot in shots:
        messages += [{"role": "user", "content": shot.text}, {"role": "assistant", "content": say(shot.target)}]
    messages.append({"role": "user", "content": doc.text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
