"""Measure how much updating each unit (layer x module x channel ratio) alone helps the task, and what it breaks.

`method="measured"` is PockEngine's procedure: for every unit, start from the frozen model, fine-tune only that unit
for `steps` AdamW steps with the Pock adapter (so each trial gets the depth-cut savings), and record how much the
validation loss improves over the frozen model (`gain`) and, given replay data (general prompts with the base
model's own replies), how much the loss on it rises (`damage`).

`method="proxy"` is a first-order estimate from `steps` backward passes, for the optimizer that will train. An
optimizer moves weight w by -lr * d_w per step: AdamW's first steps by d_w = sign(g_w), SGD's by d_w = g_w (g: the
mean task gradient). After `steps` steps the task loss falls by about steps * lr * sum g_w * d_w over the unit's
channels: steps * lr * sum |g_w| for AdamW, steps * lr * sum g_w^2 for SGD (which over-ranks units with large
activations when AdamW trains). Channels are ranked by the same per-channel sum, so the channels a unit would update
are the ones its gain counts. Damage on replay data is estimated the same way, to second order:
-steps * lr * sum r_w * d_w + (steps * lr)^2 / 2 * sum F_w * d_w^2, with r the mean replay gradient and F the
mean per-example squared replay gradient (an empirical Fisher).

Memory: the proxy holds the gradients of at most `max_grad_mb` MB of weights (in float32) at once (layers in groups,
top first, each a pass over the batches) and backpropagates `micro_batch_size` rows at a time through the label-only
loss, so measuring needs no more memory than training the scheme it plans.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.instructions import InstructionCollator, tokenize_rows
from ..engine.memory import current_memory_mb, release_free_memory
from ..engine.training import labelled_token_count
from ..tuner import PockConfig, get_pock_model
from ..tuner.depth_cut import find_decoder_layers
from ..tuner.fingerprint import model_fingerprint
from ..tuner.loss import IGNORE_INDEX, install_label_only_loss, label_only_loss, remove_label_only_loss
from ..tuner.sparse_backward import channel_count
from .memory_plan import DTYPE_BYTES, estimate_training_memory
from .table import LLAMA_LAYER_MODULES, WHOLE_LAYER, SensitivityRow, SensitivityTable

METHODS = ("measured", "proxy")
GRANULARITIES = ("module", "layer")
PROXY_OPTIMIZERS = ("adamw", "sgd")
MB = 2**20
FLOAT32_BYTES = 4  # the proxy reduces gradients in float32, a module at a time
# float32 temporaries of one module the proxy holds at once while it reduces a gradient (|g|, the replay terms)
REDUCTION_TEMPORARIES = 4
# of the memory left beside the proxy's estimated working memory, kept free: the allocator's slack and what no estimate
# counts (on a 110 MB float32 Llama a no-grad forward alone rose 17 MB above the resting process, a tenth of the spare)
ALLOCATOR_SLACK_RATIO = 0.2


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


def data_fingerprint(train: Sequence[dict], evaluation: Sequence[dict], replay: Sequence[dict] = ()) -> str:
    """A digest of the exact token ids and labels a measurement used."""
    digest = hashlib.sha256()
    splits = (*train, {"split": "eval"}, *evaluation)
    if replay:
        splits += ({"split": "replay"}, *replay)
    for example in splits:
        digest.update(json.dumps({k: example.get(k) for k in ("input_ids", "labels", "split")}).encode())
    return digest.hexdigest()[:16]


def fixed_batches(examples: list[dict], collate, batch_size: int, count: int, seed: int) -> list[dict]:
    """`count` batches drawn in a seeded shuffled order (cycling): every trial sees the same data."""
    order, rng = [], random.Random(seed)
    while len(order) < batch_size * count:
        order += rng.sample(range(len(examples)), len(examples))
    return [collate([examples[i] for i in order[b * batch_size : (b + 1) * batch_size]]) for b in range(count)]


@dataclass
class MeasurementData:
    """The batches every measurement of one table uses: `steps` training batches, the validation and replay
    examples in batches (replay empty without replay data), and the fingerprint of all of it."""

    train_batches: list[dict]
    eval_batches: list[dict]
    replay_batches: list[dict]
    fingerprint: str


def prepare_measurement_data(
    tokenizer,
    train_data: Sequence[dict],
    eval_data: Sequence[dict],
    replay_data: Sequence[dict] | None = None,
    *,
    batch_size: int,
    steps: int,
    max_length: int,
    seed: int,
) -> MeasurementData:
    """Tokenize (unless already tokenized) and batch the data of a measurement; the same arguments give the same
    batches and fingerprint, so a table's measured schemes can be added later on exactly its data.

    Raises:
        ValueError: no rows, or every row of a split dropped by tokenization.
    """
    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0)
    train = as_examples(train_data, tokenizer, max_length, "training")
    evaluation = as_examples(eval_data, tokenizer, max_length, "validation")
    replay = as_examples(replay_data, tokenizer, max_length, "replay") if replay_data else []

    def batches(examples: list[dict]) -> list[dict]:
        return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]

    return MeasurementData(
        train_batches=fixed_batches(train, collate, batch_size, steps, seed),
        eval_batches=batches(evaluation),
        replay_batches=batches(replay),
        fingerprint=data_fingerprint(train, evaluation, replay),
    )


@torch.no_grad()
def example_losses(model: nn.Module, batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Summed loss (nats) and labelled-token count of every example in `batches`, in order.

    `model` is a causal LM (plain or Pock-wrapped, not wrapped by accelerate); the head runs only at labelled
    positions, so no [tokens x vocab] logits are made.
    """
    was_training = model.training
    model.eval()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    sums, counts = [], []
    try:
        for batch in batches:
            hidden = decoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state
            for row in range(hidden.shape[0]):
                labels = batch["labels"][row : row + 1]
                sums.append(label_only_loss(hidden[row : row + 1], labels, head, num_items_in_batch=1).item())
                counts.append(int((labels[:, 1:] != IGNORE_INDEX).sum()))
    finally:
        model.train(was_training)
    return np.array(sums), np.array(counts, dtype=float)


def evaluate_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean loss per labelled token over `batches` (nats/token), computed on labelled positions only.

    Raises:
        ValueError: the batches hold no labelled token.
    """
    sums, counts = example_losses(model, batches)
    if counts.sum() <= 0:
        raise ValueError("The validation data has no labelled token to measure a loss on.")
    return float(sums.sum() / counts.sum())


def paired_difference(before: np.ndarray, after: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Mean per-token decrease from `before` to `after` (per-example loss sums over the same examples) and its
    standard error, paired over examples (a ratio estimator: examples differ in length)."""
    total = counts.sum()
    if total <= 0:
        raise ValueError("The data has no labelled token to measure a loss on.")
    differences = before - after
    mean = float(differences.sum() / total)
    residuals = differences - mean * counts
    n = len(counts)
    se = float(math.sqrt(n / max(n - 1, 1) * float(residuals @ residuals)) / total)
    return mean, se


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
    replay_data: Sequence[dict] | None = None,
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
    proxy_optimizer: str = "adamw",
    micro_batch_size: int | None = None,
    max_grad_mb: float | None = None,
    budget_mb: float | None = None,
    progress: bool = True,
    resume_path: str | os.PathLike | None = None,
) -> SensitivityTable:
    """Build a `SensitivityTable` for `model` (a plain transformers model, not yet wrapped).

    `train_data`/`eval_data`/`replay_data` are instruction rows or tokenized examples; `replay_data` (general prompts
    with the base model's own replies) adds each unit's damage. Units are every layer in `layers` (default all) times
    every module path in `modules` (default the Llama linears), or whole layers with `granularity="layer"`, times
    every ratio in `ratios`. Measured mode runs `steps` AdamW steps (learning rate `lr`) per unit; proxy mode uses
    `steps` backward passes per group of layers, estimating the step of `proxy_optimizer` (`"adamw"` or `"sgd"`),
    `micro_batch_size` rows per backward (default: the whole batch; the result is the same), holding at most
    `max_grad_mb` MB of weight gradients at once (default: what `budget_mb`, the process's peak memory ceiling in MB,
    leaves; see `proxy_gradient_allowance_mb`; without either, every candidate at once). Deterministic given `seed`.
    The model is returned to its original state (weights, requires_grad, forward) afterwards.

    With `resume_path`, the table measured so far is written there atomically after the baseline and after every
    unit, and the units an existing file at that path already holds are taken from it instead of being measured
    again, so a measurement killed at any moment continues where it stopped and gives the same table. Proxy mode
    measures all units in one go: there the file is reused only when complete. The caller deletes the file once
    the finished table is saved elsewhere.

    Raises:
        ValueError: unknown method, granularity, proxy optimizer, module path or layer index, ratio outside (0, 1],
            non-positive steps, batch size, micro-batch size, max length, learning rate, gradient memory or budget, a
            budget that cannot hold the proxy's working memory and one layer's gradients, data with nothing to learn
            from, or a `resume_path` file made with another model, data or settings (the message names what differs).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}.")
    if proxy_optimizer not in PROXY_OPTIMIZERS:
        raise ValueError(f"proxy_optimizer {proxy_optimizer!r} is not one of {PROXY_OPTIMIZERS}.")
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"ratios must be in (0, 1], got {list(ratios)}.")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if micro_batch_size is not None and (
        isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1
    ):
        raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}.")
    for name, value in (("lr", lr), ("max_grad_mb", max_grad_mb), ("budget_mb", budget_mb)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}.")
    layers_name, stack = find_decoder_layers(model)
    layer_modules = layer_module_paths(model, layers_name, modules)
    layers = list(range(len(stack))) if layers is None else list(layers)
    if not layers or any(not 0 <= layer < len(stack) for layer in layers):
        raise ValueError(f"layers must be in [0, {len(stack)}), got {layers}.")

    data = prepare_measurement_data(
        tokenizer,
        train_data,
        eval_data,
        replay_data,
        batch_size=batch_size,
        steps=steps,
        max_length=max_length,
        seed=seed,
    )
    unit_modules = [WHOLE_LAYER] if granularity == "layer" else list(layer_modules)
    settings = {
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
    }
    if method == "proxy":
        settings["proxy_optimizer"] = proxy_optimizer
    table = SensitivityTable(
        rows=[],
        model_fingerprint=model_fingerprint(model),
        data_fingerprint=data.fingerprint,
        layers_name=layers_name,
        layer_modules=layer_modules,
        settings=settings,
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
            table.baseline, table.replay_baseline = partial.baseline, partial.replay_baseline
        else:
            table.baseline = evaluate_loss(model, data.eval_batches)
            table.replay_baseline = evaluate_loss(model, data.replay_batches) if data.replay_batches else None
            save()
        if method == "measured":
            _measure(model, table, trials, done, data, lr, axis, seed, progress, save)
        elif all(trial in done for trial in trials):
            table.rows = [done[trial] for trial in trials]
            table.channel_importance = partial.channel_importance
        else:
            proxy = _Proxy(model, table, data, lr * steps, proxy_optimizer, axis, micro_batch_size, progress)
            if max_grad_mb is None and budget_mb is not None:
                max_grad_mb = proxy_gradient_allowance_mb(
                    model, data, micro_batch_size, budget_mb, candidate_modules(table, trials)
                )
            proxy.run(trials, max_grad_mb)
            save()
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        release_free_memory(next(model.parameters()).device)
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


def train_scheme(model: nn.Module, config: PockConfig, train_batches: list[dict], lr: float, seed: int) -> nn.Module:
    """`model` wrapped with the Pock adapter `config` and trained on `train_batches` (one AdamW step each, learning
    rate `lr`, no weight decay). The caller unloads it (`wrapped.unload()`), which gives the base model back
    untouched: the deltas live beside the frozen weights."""
    torch.manual_seed(seed)
    wrapped = get_pock_model(model, config)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    wrapped.train()
    for batch in train_batches:
        wrapped(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return wrapped


def _measure(model, table, trials, done, data: MeasurementData, lr, axis, seed, progress, save) -> None:
    """Append a measured row per trial, in trial order: from `done` where it is there, else measured and `save`d."""
    for layer, module, ratio in tqdm(trials, desc="measuring sensitivity", unit="unit", disable=not progress):
        if (layer, module, ratio) in done:
            table.rows.append(done[layer, module, ratio])
            continue
        config = PockConfig(scheme=dict.fromkeys(table.module_names(layer, module), ratio), channel_axis=axis)
        wrapped = train_scheme(model, config, data.train_batches, lr, seed)
        try:
            gain = table.baseline - evaluate_loss(wrapped, data.eval_batches)
            damage = None
            if data.replay_batches:
                damage = evaluate_loss(wrapped, data.replay_batches) - table.replay_baseline
        finally:
            wrapped.unload()
        steps = len(data.train_batches)
        table.rows.append(SensitivityRow(layer, module, ratio, gain, "measured", steps, "loss", damage))
        save()


def candidate_modules(table: SensitivityTable, trials: Sequence[tuple[int, str, float]]) -> dict[int, set[str]]:
    """Per decoder layer, the module names the `(layer, module, ratio)` trials touch."""
    by_layer: dict[int, set[str]] = {}
    for layer, module, _ in trials:
        by_layer.setdefault(layer, set()).update(table.module_names(layer, module))
    return by_layer


def proxy_gradient_allowance_mb(
    model: nn.Module,
    data: MeasurementData,
    micro_batch_size: int | None,
    budget_mb: float,
    by_layer: dict[int, set[str]],
) -> float:
    """MB of weight gradients the proxy may hold at once for this process to peak within `budget_mb` MB: the budget
    less what the process holds now and the proxy's working memory, less a fifth of what then remains for the
    allocator's slack and what no estimate counts. The working memory is the larger of a training micro-batch
    (`micro_batch_size` rows, default the batch, at the longest batch's length) and a replay example backpropagated
    through every decoder layer (their activations and the label-only loss's logits, as
    `memory_plan.estimate_training_memory` counts them), plus the float32 temporaries of reducing the largest
    module's gradient. `by_layer` holds the candidate module names per layer: whole layers make the groups.

    Raises:
        ValueError: the allowance cannot hold the gradients of one layer's modules in `by_layer` (the proxy's
            smallest group); the message says what the budget, the process and the working memory each take.
    """
    layers_name, _ = find_decoder_layers(model)
    dtype = str(getattr(model, "dtype", torch.float32)).removeprefix("torch.")

    def activations_mb(rows: int, tokens: int) -> float:
        estimate = estimate_training_memory(
            model, layers_name=layers_name, cut_layer=0, batch_size=rows, seq_len=tokens,
            dtype=dtype if dtype in DTYPE_BYTES else "float32",
        )  # fmt: skip
        return estimate.activations_mb + estimate.logits_mb

    longest = max(batch["input_ids"].shape[1] for batch in data.train_batches)
    batch_rows = data.train_batches[0]["input_ids"].shape[0]
    rows = min(micro_batch_size or batch_rows, batch_rows)
    working = activations_mb(rows, longest)
    if data.replay_batches:
        working = max(working, activations_mb(1, max(batch["input_ids"].shape[1] for batch in data.replay_batches)))
    linears = [[model.get_submodule(name).weight for name in names] for names in by_layer.values()]
    largest = max(w.numel() for weights in linears for w in weights)
    working += REDUCTION_TEMPORARIES * largest * FLOAT32_BYTES / MB
    held = current_memory_mb(next(model.parameters()).device)
    allowance = (budget_mb - held - working) * (1 - ALLOCATOR_SLACK_RATIO)
    layer_mb = max(sum(w.numel() * w.element_size() for w in weights) for weights in linears) / MB
    if allowance < layer_mb:
        raise ValueError(
            f"Measuring sensitivity (proxy) cannot fit a {budget_mb:,.0f} MB budget: the process holds {held:,.0f} "
            f"MB, backpropagating a {rows}-row micro-batch of {longest} tokens needs about {working:,.0f} MB more, "
            f"and one layer's gradients {layer_mb:,.1f} MB. Raise the budget, lower the micro-batch or max length, or "
            "measure the table on a bigger machine (`pock sensitivity` writes it to a file) and plan with it here."
        )
    return allowance


class _Proxy:
    """First-order gains (and second-order damage) of every unit from backward passes, a group of layers at a time.

    Per weight w of a candidate module: g_w, the task gradient averaged over the training batches; the optimizer's
    direction d_w (sign(g_w) for AdamW, g_w for SGD); and with replay data r_w, the mean per-example replay
    gradient, and F_w, the mean per-example squared replay gradient. Per output (or input) channel, summed over its
    weights: importance = sum g_w d_w, cross = sum r_w d_w, curvature = sum F_w d_w^2. A unit's k channels are its
    k most important; its gain is `displacement` x their importance and its damage
    -displacement x their cross + displacement^2 / 2 x their curvature, where `displacement` = steps x lr.
    """

    def __init__(self, model, table, data: MeasurementData, displacement, optimizer, axis, micro_batch_size, progress):
        self.model, self.table, self.data = model, table, data
        self.displacement, self.optimizer, self.axis = displacement, optimizer, axis
        self.micro_batch_size, self.progress = micro_batch_size, progress
        self.reduce_dim = 1 if axis == "out" else 0
        self.cross: dict[str, torch.Tensor] = {}
        self.curvature: dict[str, torch.Tensor] = {}

    def run(self, trials, max_grad_mb: float | None) -> None:
        by_layer = candidate_modules(self.table, trials)
        for p in self.model.parameters():
            p.requires_grad_(False)
        was_training = self.model.training
        self.model.train()
        install_label_only_loss(self.model)  # no [tokens x vocab] logits, neither in forward nor in backward
        try:
            for group in self._groups(by_layer, max_grad_mb):
                self._measure_group(group)
        finally:
            remove_label_only_loss(self.model)
            self.model.train(was_training)
        for layer, module, ratio in trials:
            gain = damage = 0.0
            for name in self.table.module_names(layer, module):
                scores = torch.tensor(self.table.channel_importance[name])
                top = scores.topk(channel_count(ratio, scores.numel())).indices
                gain += self.displacement * scores[top].sum().item()
                if name in self.cross:
                    damage += (
                        -self.displacement * self.cross[name][top].sum().item()
                        + self.displacement**2 / 2 * self.curvature[name][top].sum().item()
                    )
            damage = damage if self.data.replay_batches else None
            steps = len(self.data.train_batches)
            self.table.rows.append(SensitivityRow(layer, module, ratio, gain, "proxy", steps, "loss", damage))

    def _groups(self, by_layer: dict[int, set[str]], max_grad_mb: float | None) -> list[list[str]]:
        """Module names in groups of whole layers, top layer first, each holding at most `max_grad_mb` MB of
        gradients (a layer that alone is larger forms its own group). A gradient is held in its weight's dtype and
        its direction takes its place, so a bf16 model's group holds twice the weights of a float32 one's."""
        groups, current, size = [], [], 0.0
        for layer in sorted(by_layer, reverse=True):
            names = sorted(by_layer[layer])
            layer_mb = sum(self._weight(n).numel() * self._weight(n).element_size() for n in names) / MB
            if current and max_grad_mb is not None and size + layer_mb > max_grad_mb:
                groups.append(current)
                current, size = [], 0.0
            current += names
            size += layer_mb
        return [*groups, current] if current else groups

    def _weight(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight

    def _micro_batches(self, batch: dict):
        rows = batch["input_ids"].shape[0]
        size = self.micro_batch_size or rows
        for start in range(0, rows, size):
            yield {key: value[start : start + size] for key, value in batch.items()}

    def _measure_group(self, names: list[str]) -> None:
        weights = {name: self._weight(name) for name in names}
        for weight in weights.values():
            weight.requires_grad_(True)
        try:
            batches = self.data.train_batches
            for batch in tqdm(batches, desc=f"proxy: {len(names)} modules", disable=not self.progress, leave=False):
                tokens = labelled_token_count(batch)
                for micro in self._micro_batches(batch):
                    # micro-batch sum / the batch's labelled tokens: the micro-batches add up to the batch mean
                    loss = self.model(**micro, num_items_in_batch=max(tokens, 1), use_cache=False).loss
                    (loss / len(batches)).backward()
            directions = {}
            for name, weight in weights.items():
                gradient, weight.grad = weight.grad, None
                # g * d per weight: |g| for AdamW's sign step, g^2 for SGD's, reduced in float32
                product = gradient.float().abs() if self.optimizer == "adamw" else gradient.float().square()
                self.table.channel_importance[name] = product.sum(dim=self.reduce_dim).tolist()
                # the direction takes the gradient's own memory (a sign is exact in any dtype): a fresh tensor per
                # module would leave the freed gradients as holes the allocator keeps, up to twice the group resident
                directions[name] = gradient.sign_() if self.optimizer == "adamw" else gradient
            if self.data.replay_batches:
                self._replay(weights, directions)
        finally:
            for weight in weights.values():
                weight.requires_grad_(False)
                weight.grad = None
            release_free_memory(next(iter(weights.values())).device)  # the next group starts from the same memory

    def _replay(self, weights: dict[str, torch.Tensor], directions: dict[str, torch.Tensor]) -> None:
        """Per-channel cross and curvature terms from replay micro-batch gradients, reduced in the gradient hooks
        so no replay gradient outlives its own backward."""
        cross = {name: torch.zeros(d.shape[1 - self.reduce_dim]) for name, d in directions.items()}
        curvature = {name: torch.zeros_like(cross[name]) for name in directions}
        # one example per backward: F is then the per-example squared gradient, whatever the micro-batch size
        micro_batches = [
            {key: value[row : row + 1] for key, value in batch.items()}
            for batch in self.data.replay_batches
            for row in range(batch["input_ids"].shape[0])
        ]
        handles = []
        for name, weight in weights.items():

            def reduce(parameter, name=name):
                gradient, direction = parameter.grad.float(), directions[name].float()
                cross[name] += (gradient * direction).sum(dim=self.reduce_dim) / len(micro_batches)
                curvature[name] += (gradient.square() * direction.square()).sum(dim=self.reduce_dim) / len(
                    micro_batches
                )
                parameter.grad = None

            handles.append(weight.register_post_accumulate_grad_hook(reduce))
        try:
            for micro in micro_batches:
                self.model(**micro, use_cache=False).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        self.cross.update(cross)
        self.curvature.update(curvature)


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


def scheme_channel_indices(table: SensitivityTable, scheme: dict[str, float]) -> dict[str, list[int]] | None:
    """`gradient_channel_indices` where the table ranks the channels of every scheme module (proxy mode), else None
    (the config's own channel selection applies): the channels the gains were estimated for."""
    if table.channel_importance and all(name in table.channel_importance for name in scheme):
        return gradient_channel_indices(table, scheme)
    return None
