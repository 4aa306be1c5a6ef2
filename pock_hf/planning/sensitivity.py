"""Measure how much updating each unit (layer x module x channel ratio) alone helps the task.

`method="measured"` is PockEngine's procedure: for every unit, start from the frozen model, fine-tune only that unit
for `steps` steps with the Pock adapter (so each trial gets the depth-cut savings), and record how much the
validation loss improves over the frozen model. `method="proxy"` is a cheap first-order estimate from a few
backward passes: the loss decrease one SGD step of size `lr` on the unit's top-k channels would give,
lr * sum of the k largest per-channel squared gradient norms. The proxy also yields per-channel importance, which
`gradient_channel_indices` turns into `PockConfig.channel_indices`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.instructions import InstructionCollator, tokenize_rows
from ..engine.training import labelled_token_count
from ..tuner import PockConfig, get_pock_model
from ..tuner.depth_cut import find_decoder_layers
from ..tuner.fingerprint import model_fingerprint
from ..tuner.sparse_backward import channel_count
from .table import LLAMA_LAYER_MODULES, WHOLE_LAYER, SensitivityRow, SensitivityTable

METHODS = ("measured", "proxy")
GRANULARITIES = ("module", "layer")


def as_examples(data: Sequence[dict], tokenizer, max_length: int, what: str = "training") -> list[dict]:
    """Tokenized examples from instruction rows (Alpaca / chat), or `data` itself if it is already tokenized.

    Raises:
        ValueError: no rows, or every row dropped by tokenization (the message gives the counts and `what` data).
    """
    if not data:
        raise ValueError(f"The {what} data holds no rows.")
    if "input_ids" in data[0]:
        return list(data)
    examples, report = tokenize_rows(list(data), tokenizer, max_length=max_length)
    if not examples:
        raise ValueError(f"No usable {what} example left after tokenization ({report}); raise max_length.")
    return examples


def data_fingerprint(train: Sequence[dict], evaluation: Sequence[dict]) -> str:
    """A digest of the exact token ids and labels a measurement used."""
    digest = hashlib.sha256()
    for example in (*train, {"split": "eval"}, *evaluation):
        digest.update(json.dumps({k: example.get(k) for k in ("input_ids", "labels", "split")}).encode())
    return digest.hexdigest()[:16]


def fixed_batches(examples: list[dict], collate, batch_size: int, count: int, seed: int) -> list[dict]:
    """`count` batches drawn in a seeded shuffled order (cycling): every trial sees the same data."""
    order, rng = [], random.Random(seed)
    while len(order) < batch_size * count:
        order += rng.sample(range(len(examples)), len(examples))
    return [collate([examples[i] for i in order[b * batch_size : (b + 1) * batch_size]]) for b in range(count)]


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean loss per labelled token over `batches` (each batch's mean weighted by its labelled-token count)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        count = labelled_token_count(batch)
        if count:
            total += model(**batch).loss.item() * count
            tokens += count
    model.train(was_training)
    if not tokens:
        raise ValueError("The validation data has no labelled token to measure a loss on.")
    return total / tokens


def layer_module_paths(model: nn.Module, layers_name: str, modules: Sequence[str] | None) -> tuple[str, ...]:
    """The linear modules inside a decoder layer to measure (default: the Llama set), checked against the model."""
    first_layer = model.get_submodule(f"{layers_name}.0")
    present = tuple(name for name, m in first_layer.named_modules() if isinstance(m, nn.Linear))
    chosen = tuple(modules) if modules is not None else tuple(m for m in LLAMA_LAYER_MODULES if m in present)
    unknown = [m for m in chosen if m not in present]
    if unknown or not chosen:
        raise ValueError(f"Unknown module(s) {unknown} inside a decoder layer; valid: {list(present)}.")
    return chosen


def measure_sensitivity(
    model: nn.Module,
    tokenizer,
    train_data: Sequence[dict],
    eval_data: Sequence[dict],
    *,
    method: str = "measured",
    ratios: Sequence[float] = (0.25, 1.0),
    modules: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    granularity: str = "module",
    steps: int = 8,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 256,
    axis: str = "out",
    seed: int = 0,
    progress: bool = True,
    resume_path: str | os.PathLike | None = None,
) -> SensitivityTable:
    """Build a `SensitivityTable` for `model` (a plain transformers model, not yet wrapped).

    `train_data`/`eval_data` are instruction rows or tokenized examples. Units are every layer in `layers` (default
    all) times every module path in `modules` (default the Llama linears), or whole layers with
    `granularity="layer"`, times every ratio in `ratios`. Measured mode runs `steps` AdamW steps (learning rate `lr`)
    per unit; proxy mode uses `steps` backward passes in total. Deterministic given `seed`. The model is returned to
    its original state (weights, requires_grad) afterwards.

    With `resume_path`, the table measured so far is written there atomically after the baseline and after every
    unit, and the units an existing file at that path already holds are taken from it instead of being measured
    again, so a measurement killed at any moment continues where it stopped and gives the same table. Proxy mode
    measures all units in one pass: there the file is reused only when complete. The caller deletes the file once
    the finished table is saved elsewhere.

    Raises:
        ValueError: unknown method, granularity, module path or layer index, ratio outside (0, 1], non-positive
            steps, batch size, max length or learning rate, data with nothing to learn from, or a `resume_path` file
            made with another model, data or settings (the message names what differs).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}.")
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"ratios must be in (0, 1], got {list(ratios)}.")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    layers_name, stack = find_decoder_layers(model)
    layer_modules = layer_module_paths(model, layers_name, modules)
    layers = list(range(len(stack))) if layers is None else list(layers)
    if not layers or any(not 0 <= layer < len(stack) for layer in layers):
        raise ValueError(f"layers must be in [0, {len(stack)}), got {layers}.")

    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0)
    train = as_examples(train_data, tokenizer, max_length, "training")
    evaluation = as_examples(eval_data, tokenizer, max_length, "validation")
    train_batches = fixed_batches(train, collate, batch_size, steps, seed)
    eval_batches = [collate(evaluation[i : i + batch_size]) for i in range(0, len(evaluation), batch_size)]
    unit_modules = [WHOLE_LAYER] if granularity == "layer" else list(layer_modules)
    table = SensitivityTable(
        rows=[],
        model_fingerprint=model_fingerprint(model),
        data_fingerprint=data_fingerprint(train, evaluation),
        layers_name=layers_name,
        layer_modules=layer_modules,
        settings={
            "method": method,
            "ratios": list(ratios),
            "layers": layers,
            "granularity": granularity,
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "axis": axis,
            "seed": seed,
        },
    )
    partial = _load_partial(resume_path, table) if resume_path is not None else None

    def save() -> None:
        if resume_path is not None:
            table.to_json(resume_path)

    trials = [(layer, module, ratio) for layer in layers for module in unit_modules for ratio in ratios]
    done = {(row.layer, row.module, row.ratio): row for row in partial.rows} if partial is not None else {}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if partial is not None and partial.baseline is not None:
            table.baseline = partial.baseline
        else:
            table.baseline = evaluate_loss(model, eval_batches)
            save()
        if method == "measured":
            _measure(model, table, trials, done, train_batches, eval_batches, lr, axis, seed, progress, save)
        elif all(trial in done for trial in trials):
            table.rows = [done[trial] for trial in trials]
            table.channel_importance = partial.channel_importance
        else:
            _proxy(model, table, trials, train_batches, lr, axis, progress)
            save()
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
    return table


def _load_partial(path: str | os.PathLike, table: SensitivityTable) -> SensitivityTable | None:
    """The partial table at `path` if there is one, after checking it was measured like `table` (no rows yet).

    Raises:
        ValueError: it is not a table, or was made with another model, data, decoder-layer modules or settings.
    """
    if not Path(path).exists():
        return None
    partial = SensitivityTable.from_json(path)
    differences = []
    if partial.model_fingerprint.get("digest") != table.model_fingerprint.get("digest"):
        differences.append(
            f"model fingerprint {partial.model_fingerprint.get('digest')} (now {table.model_fingerprint.get('digest')})"
        )
    if partial.data_fingerprint != table.data_fingerprint:
        differences.append(f"data fingerprint {partial.data_fingerprint} (now {table.data_fingerprint})")
    if (partial.layers_name, partial.layer_modules) != (table.layers_name, table.layer_modules):
        differences.append(f"modules {list(partial.layer_modules)} (now {list(table.layer_modules)})")
    for key in sorted(set(partial.settings) | set(table.settings)):
        if partial.settings.get(key) != table.settings.get(key):
            differences.append(f"{key}={partial.settings.get(key)!r} (now {table.settings.get(key)!r})")
    if differences:
        raise ValueError(
            f"{os.fspath(path)} holds a partial sensitivity measurement made with another setup: "
            f"{'; '.join(differences)}. Delete it to start over, or resume with the same model, data and settings."
        )
    return partial


def trial_loss(
    model: nn.Module, config: PockConfig, train_batches: list[dict], eval_batches: list[dict], lr: float, seed: int
) -> float:
    """Validation loss after training the Pock adapter `config` on `train_batches` (one AdamW step each, learning
    rate `lr`). The base model comes back untouched: the adapter is unloaded, and the deltas lived beside the weights."""
    torch.manual_seed(seed)
    wrapped = get_pock_model(model, config)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    wrapped.train()
    for batch in train_batches:
        wrapped(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss = evaluate_loss(wrapped, eval_batches)
    wrapped.unload()
    return loss


def _measure(model, table, trials, done, train_batches, eval_batches, lr, axis, seed, progress, save) -> None:
    """Append a measured row per trial, in trial order: from `done` where it is there, else measured and `save`d."""
    for layer, module, ratio in tqdm(trials, desc="measuring sensitivity", unit="unit", disable=not progress):
        if (layer, module, ratio) in done:
            table.rows.append(done[layer, module, ratio])
            continue
        config = PockConfig(scheme=dict.fromkeys(table.module_names(layer, module), ratio), channel_axis=axis)
        loss = trial_loss(model, config, train_batches, eval_batches, lr, seed)
        table.rows.append(
            SensitivityRow(layer, module, ratio, table.baseline - loss, "measured", len(train_batches), "loss")
        )
        save()


def _proxy(model, table, trials, train_batches, lr, axis, progress) -> None:
    names = sorted({name for layer, module, _ in trials for name in table.module_names(layer, module)})
    weights = {name: model.get_submodule(name).weight for name in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    was_training = model.training
    model.train()
    try:
        for batch in tqdm(train_batches, desc="proxy sensitivity (backward passes)", disable=not progress):
            (model(**batch).loss / len(train_batches)).backward()
        for name, weight in weights.items():
            # squared gradient norm per channel: the first-order loss decrease of an SGD step on that channel
            table.channel_importance[name] = weight.grad.float().pow(2).sum(dim=1 if axis == "out" else 0).tolist()
            weight.grad = None
    finally:
        model.train(was_training)
    for layer, module, ratio in trials:
        gain = 0.0
        for name in table.module_names(layer, module):
            scores = torch.tensor(table.channel_importance[name])
            gain += lr * scores.topk(channel_count(ratio, scores.numel())).values.sum().item()
        table.rows.append(SensitivityRow(layer, module, ratio, gain, "proxy", len(train_batches), "loss"))


def gradient_channel_indices(table: SensitivityTable, scheme: dict[str, float]) -> dict[str, list[int]]:
    """For each scheme module, the k = round(ratio * channels) channels with the largest proxy importance, as
    `PockConfig(channel_indices=...)` takes them.

    Raises:
        ValueError: the table holds no channel importance for a module (measure it with `method="proxy"`).
    """
    indices = {}
    for name, ratio in scheme.items():
        if name not in table.channel_importance:
            raise ValueError(f"The table has no channel importance for {name!r}; measure it with method='proxy'.")
        scores = torch.tensor(table.channel_importance[name])
        indices[name] = sorted(scores.topk(channel_count(ratio, scores.numel())).indices.tolist())
    return indices
