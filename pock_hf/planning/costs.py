"""The on-device cost of a Pock scheme: measured step time and memory per cut depth, plus per-unit extras.

A scheme's cost is dominated by its cut: everything above the deepest updated layer runs backward. The profile
measures, on the device that will train, a training step for every cut depth (with a minimal trainable unit at that
layer) and the extra time of updating each module type in full; memory is counted exactly where it can be
(weights, the activations autograd saves above the cut, and per-unit parameter + gradient + AdamW state), and what
it cannot count (the interpreter and its libraries, allocator slack, transient buffers of a step) is measured as the
*overhead*: the process's peak during a profiled step minus what was counted, per timed cut depth (it grows with the
depth of backward) and interpolated between. So a planned scheme's memory is the process's peak while it trains,
which is what a memory budget means.

The full fine-tuning reference is timed without any optimizer state (each parameter's AdamW arithmetic runs on
temporary state in its gradient hook, and the gradient is dropped there). With `budget_mb`, profiling stays within it
too: cut depths whose step would not fit are neither timed nor held (their activation memory is extrapolated from the
layers above, exactly for a stack of identical layers), and the full step, which saves more activations than any
Pock cut, is estimated from the cut-0 step and the module updates instead of run.

With `gradient_checkpointing`, every profiled step runs checkpointed above its cut, as the training will: autograd
then saves only each checkpointed layer's input (and what lies outside the layers), which the same count sees, and
the one layer recomputed at a time in backward is part of the measured overhead. A deep cut then costs little memory
and more time, and the planner weighs both from what was measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.memory import current_memory_mb, peak_memory_mb, release_free_memory, start_measured_phase
from ..io.files import atomic_write_text, check_format_version, dataclass_from_json, read_json_object
from ..tuner import PockConfig, get_pock_model
from ..tuner.depth_cut import checkpointing_restored, find_decoder_layers
from ..tuner.fingerprint import check_model_fingerprint, model_fingerprint
from ..tuner.sparse_backward import channel_count
from .sensitivity import layer_module_paths
from .table import WHOLE_LAYER

COSTS_FORMAT_VERSION = 1
MB = 2**20
# A trained value costs its parameter, its gradient, AdamW's two moments and, at the optimizer step, a fifth: the
# foreach AdamW computes the denominator sqrt(v) + eps into a new tensor list before the update. Counted with four
# and each cut's own overhead, a plan at the ceiling trained 6-10 MB over it (tests/test_planning_memory.py).
TRAINED_VALUE_COPIES = 5

# Memory budgets (MB) of device presets. Presets only set the budget; costs always come from the profiler run on the
# device that trains. Jetson memory is shared with the OS, so a few GB are left to it; "cpu" is half of this machine's
# physical memory.
DEVICE_BUDGETS_MB = {
    "cpu": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / MB if hasattr(os, "sysconf") else 8 * 1024,
    "jetson-orin-nano-8gb": 6 * 1024,
    "jetson-agx-orin-32gb": 28 * 1024,
    "jetson-agx-orin-64gb": 58 * 1024,
    "gpu-12gb": 11 * 1024,
    "gpu-16gb": 15 * 1024,
    "gpu-24gb": 22 * 1024,
}


@dataclass
class CostProfile:
    """Measured costs of training steps of one model on one device, for one batch shape.

    Lists indexed by cut depth c (0 .. num_layers-1): `step_s_by_cut[c]` is the median step time (s) with backward
    down to layer c, `activation_mb_by_cut[c]` the activation memory (MB) autograd keeps for that backward.
    `unit_extra_s[module]` is the extra step time (s) of updating `module` (a path inside a layer) at ratio 1; it
    scales linearly with the ratio. `module_shapes[module]` is its weight's [out, in]. `overhead_mb` is the process
    memory (MB) beyond weights, saved activations and trained values at the peak of a step (0 in profiles that did
    not measure it): the largest over the timed cuts, and `overhead_mb_by_cut[c]` the overhead at cut c
    (interpolated between timed cuts like the step times, never less for a deeper cut; empty in profiles from before
    it, which use `overhead_mb` for every cut). `bytes_per_value` is the size of one trained value (float32 deltas
    also on a bf16 base) and `trained_value_copies` how many copies of it a step holds at its peak (AdamW:
    `TRAINED_VALUE_COPIES`).
    """

    device: str
    model_fingerprint: dict
    batch_size: int
    seq_len: int
    num_layers: int
    weights_mb: float
    forward_s: float
    full_step_s: float
    step_s_by_cut: list[float]
    activation_mb_by_cut: list[float]
    module_shapes: dict[str, list[int]]
    unit_extra_s: dict[str, float]
    bytes_per_value: int = 4
    overhead_mb: float = 0.0
    overhead_mb_by_cut: list[float] = field(default_factory=list)
    trained_value_copies: int = TRAINED_VALUE_COPIES
    settings: dict = field(default_factory=dict)
    format_version: int = COSTS_FORMAT_VERSION

    def modules_of(self, module: str) -> list[str]:
        return list(self.module_shapes) if module == WHOLE_LAYER else [module]

    def unit_memory_mb(self, module: str, ratio: float, axis: str = "out") -> float:
        """Memory (MB) of updating `module` (or `"*"`) at `ratio`: parameter, gradient, AdamW state and step."""
        values = 0
        for name in self.modules_of(module):
            out_features, in_features = self.module_shapes[name]
            channels, width = (out_features, in_features) if axis == "out" else (in_features, out_features)
            values += channel_count(ratio, channels) * width
        return values * self.bytes_per_value * self.trained_value_copies / MB

    def unit_time_s(self, module: str, ratio: float) -> float:
        """Extra step time (s) of updating `module` (or `"*"`) at `ratio`."""
        return sum(self.unit_extra_s[name] for name in self.modules_of(module)) * ratio

    def scheme_cost(self, units, axis: str = "out") -> tuple[float, float]:
        """(memory MB, step s) of training `units`, (layer, module, ratio) triples: the base cost of their cut, the
        deepest layer among them, plus each unit's own."""
        cut = min(layer for layer, _, _ in units)
        memory = self.base_memory_mb(cut) + math.fsum(self.unit_memory_mb(m, r, axis) for _, m, r in units)
        return memory, self.step_s_by_cut[cut] + math.fsum(self.unit_time_s(m, r) for _, m, r in units)

    def base_memory_mb(self, cut: int) -> float:
        """Peak process memory (MB) of a step with cut `cut`, before the units' own memory: overhead, weights and
        saved activations."""
        overhead = self.overhead_mb_by_cut[cut] if self.overhead_mb_by_cut else self.overhead_mb
        return overhead + self.weights_mb + self.activation_mb_by_cut[cut]

    def check_model(self, model: nn.Module) -> None:
        """Raise `ValueError` naming both fingerprints unless the profile was measured on `model` (unwrapped)."""
        check_model_fingerprint(self.model_fingerprint, model_fingerprint(model), "cost profile")

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CostProfile:
        """The profile in `path`, every field type-checked and the per-cut lists checked against `num_layers`.

        Raises:
            ValueError: naming the file and the field: not JSON, another format version, a missing, unknown or
                mistyped field, inconsistent lengths or non-positive sizes and times.
        """
        source = os.fspath(path)
        data = read_json_object(path, "Cost profile")
        check_format_version(data, COSTS_FORMAT_VERSION, "cost-profile", source, "profile the model again")
        profile = dataclass_from_json(cls, data, source)
        profile._check_consistent(source)
        return profile

    def _check_consistent(self, source: str) -> None:
        """What the planner relies on beyond field types: one entry per cut depth, positive sizes and times."""
        if min(self.num_layers, self.batch_size, self.seq_len, self.bytes_per_value, self.trained_value_copies) < 1:
            raise ValueError(
                f"{source}: num_layers, batch_size, seq_len, bytes_per_value and trained_value_copies must be "
                "positive."
            )
        for name in ("step_s_by_cut", "activation_mb_by_cut", "overhead_mb_by_cut"):
            if name == "overhead_mb_by_cut" and not self.overhead_mb_by_cut:
                continue  # a profile from before it: `overhead_mb` stands for every cut
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(
                    f"{source}: field {name!r} has {len(getattr(self, name))} entries; num_layers is {self.num_layers}."
                )
        if not self.full_step_s > 0:
            raise ValueError(f"{source}: field 'full_step_s' must be a positive time in seconds.")
        for module, shape in self.module_shapes.items():
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"{source}: field 'module_shapes[{module!r}]' must be [out, in], got {shape}.")
        missing = sorted(set(self.module_shapes) - set(self.unit_extra_s))
        if missing:
            raise ValueError(f"{source}: field 'unit_extra_s' has no entry for {missing[0]!r}.")


# --- the profiler ----------------------------------------------------------------------------------------------------


def profile_costs(
    model: nn.Module,
    *,
    batch_size: int = 4,
    seq_len: int = 128,
    depths: Sequence[int] | None = None,
    repeats: int = 2,
    modules: Sequence[str] | None = None,
    measure_full: bool = True,
    budget_mb: float | None = None,
    batch: dict | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> CostProfile:
    """Measure a `CostProfile` of `model` (plain, unwrapped) on the device it is on.

    A step is forward + backward + AdamW step on `batch` (a training batch: `input_ids`, `labels` and optionally
    `attention_mask`; its shape replaces `batch_size` x `seq_len`), or on random tokens of that shape, all labelled.
    Give a real batch where the memory matters: the loss's buffers grow with the labelled positions.
    Step time is the median of `repeats` timed steps after one warm-up. Cut depths not in `depths` (default: about
    eight depths spread over the stack, always including the first and last layer) are interpolated linearly;
    activation memory is counted for every depth from the tensors autograd saves (exact, device-independent). A
    timed cut's overhead is the excess of its step's process peak over its counted memory (interpolated between timed
    cuts, never less for a deeper one, and the largest for cuts left untimed under the budget; `overhead_mb` is the
    largest). `measure_full` also times a full fine-tuning step, the reference of `budget_time_ratio`; without it the
    cut-0 step stands in.

    With `budget_mb` (MB of process peak), depths whose step would exceed it are not run (see the module docstring);
    `settings["untimed_depths"]` lists them. `gradient_checkpointing` profiles checkpointed steps (non-reentrant,
    above the cut, as `PockConfig(gradient_checkpointing=True)` trains); `settings["gradient_checkpointing"]` records
    it, and the model's own checkpointing setting is restored afterwards.

    Raises:
        ValueError: the budget is below what the model and one step at the top layer need (the message gives both).
    """
    layers_name, stack = find_decoder_layers(model)
    num_layers = len(stack)
    layer_modules = layer_module_paths(model, layers_name, modules)
    if depths is None:
        depths = sorted({round(i * (num_layers - 1) / 7) for i in range(8)})
    device = next(model.parameters()).device
    given_batch = batch is not None
    if batch is None:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
        batch = {"input_ids": input_ids, "labels": input_ids}
    else:
        batch = {key: value.to(device) for key, value in batch.items()}
        batch_size, seq_len = batch["input_ids"].shape
    fingerprint = model_fingerprint(model)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    top = num_layers - 1
    release_free_memory(device)  # what earlier work freed is not this profile's overhead
    minimal = {depth: {f"{layers_name}.{depth}.{layer_modules[0]}": 1e-9} for depth in range(num_layers)}
    options = {"channel_selection": "first", "gradient_checkpointing": gradient_checkpointing}
    # profile what was asked, not what the model was left with
    with checkpointing_restored(model, gradient_checkpointing):
        try:
            with torch.no_grad():
                forward_s = _median_time(lambda: model(**batch, use_cache=False), repeats)
            activation = _activation_by_cut(model, minimal, batch, weights_mb, budget_mb, device, options)
            overhead, measured, untimed, excess = 0.0, {}, [], {}
            for depth in tqdm(
                sorted(set(depths) | {top}, reverse=True), desc="profiling cut depths", disable=not progress
            ):
                if budget_mb is not None and measured and overhead + weights_mb + activation[depth] > budget_mb:
                    untimed.append(depth)
                    continue
                # What earlier steps and phases freed is not this step's overhead: the training and each measured
                # candidate start from a trimmed heap too. Untrimmed, the first profiled step's excess stood for
                # every cut (SmolLM2, after the proxy: 905 MB at cut 29 against 849 MB at cut 10).
                start_measured_phase(device)
                measured[depth] = _wrapped_step_s(model, minimal[depth], batch, repeats, options)
                excess[depth] = peak_memory_mb(device) - weights_mb - activation[depth]
                overhead = max(overhead, excess[depth])
                if budget_mb is not None and depth == top and overhead + weights_mb + activation[top] > budget_mb:
                    raise ValueError(
                        f"A {budget_mb:.0f} MB budget is below what training needs at all: the model's weights "
                        f"({weights_mb:.0f} MB), the process around them ({overhead:.0f} MB) and one step at the top "
                        f"layer ({activation[top]:.0f} MB of activations) come to "
                        f"{overhead + weights_mb + activation[top]:.0f} MB. Raise the budget or train on a bigger device."
                    )
            unit_extra_s = {}
            bytes_per_value = _trained_bytes_per_value(model, minimal[top], options)
            unit_excess = {}
            for module in tqdm(layer_modules, desc="profiling module updates", disable=not progress):
                start_measured_phase(device)
                name = f"{layers_name}.{top}.{module}"
                full_module = _wrapped_step_s(model, {name: 1.0}, batch, repeats, options)
                unit_extra_s[module] = max(0.0, full_module - measured[top])
                trained = model.get_submodule(name).weight.numel() * TRAINED_VALUE_COPIES * bytes_per_value / MB
                unit_excess[module] = peak_memory_mb(device) - weights_mb - activation[top] - trained
            step_s_by_cut = _interpolate(measured, num_layers)
            full_step_s, full_step = step_s_by_cut[0], "cut 0"
            if measure_full and budget_mb is None:
                full_step_s, full_step = _full_step_s(model, batch, repeats), "timed"
            elif measure_full:
                # A full step saves the input of every linear layer, more than any Pock cut counted here, so under a
                # budget it is not run: the cut-0 step plus every module's full update in every layer stands in.
                full_step_s, full_step = step_s_by_cut[0] + num_layers * sum(unit_extra_s.values()), "estimated"
        finally:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(requires_grad[name])
            model.train(was_training)
    # The excess over what was counted grows with the depth of backward (SmolLM2-135M, checkpointed: 798 MB at cut
    # 29, 868 MB at cut 0), so each cut gets its own; a cut left untimed under the budget gets the largest.
    overhead_by_cut = [max(0.0, mb) for mb in _interpolate(excess, num_layers)]
    for depth in untimed:
        overhead_by_cut[depth] = max(overhead, 0.0)
    # a deeper cut never costs more: smooth out measurement noise so the planner's cost model is monotone
    for values in (step_s_by_cut, overhead_by_cut):
        for depth in range(num_layers - 2, -1, -1):
            values[depth] = max(values[depth], values[depth + 1])
    first = model.get_submodule(f"{layers_name}.0")
    settings = {
        "batch": "given" if given_batch else "random tokens, all labelled",
        "depths_measured": sorted(measured),
        "untimed_depths": sorted(untimed),
        # each timed step's process peak beyond weights and activations (MB), the overhead of its cut
        "step_excess_mb": {str(depth): round(mb, 1) for depth, mb in sorted(excess.items())},
        # the same at the top layer with one whole module trained, beyond its counted values too (a check on them)
        "module_step_excess_mb": {module: round(mb, 1) for module, mb in unit_excess.items()},
        "repeats": repeats,
        "seed": seed,
        "budget_mb": budget_mb,
        "full_step": full_step,
        "gradient_checkpointing": gradient_checkpointing,
    }
    return CostProfile(
        device=_device_name(device),
        model_fingerprint=fingerprint,
        batch_size=batch_size,
        seq_len=seq_len,
        num_layers=num_layers,
        weights_mb=weights_mb,
        forward_s=forward_s,
        full_step_s=full_step_s,
        step_s_by_cut=step_s_by_cut,
        activation_mb_by_cut=activation,
        module_shapes={m: list(first.get_submodule(m).weight.shape) for m in layer_modules},
        unit_extra_s=unit_extra_s,
        bytes_per_value=bytes_per_value,
        overhead_mb=max(overhead, 0.0),
        overhead_mb_by_cut=overhead_by_cut,
        settings=settings,
    )


def _activation_by_cut(model, minimal, batch, weights_mb, budget_mb, device, options) -> list[float]:
    """Activation memory (MB) for every cut, counted exactly from the top down while the counting itself fits the
    budget (the process now, plus that cut's activations), extrapolated from the two deepest counted cuts below."""
    num_layers = len(minimal)
    counted: dict[int, float] = {}
    for depth in range(num_layers - 1, -1, -1):
        if budget_mb is not None and len(counted) >= 2:
            step = counted[depth + 1] - counted[depth + 2]
            if current_memory_mb(device) + counted[depth + 1] + step > budget_mb:
                break
        counted[depth] = _activation_mb(model, minimal[depth], batch, options)
    deepest = min(counted)
    step = counted[deepest] - counted[deepest + 1] if deepest + 1 in counted else 0.0
    return [counted[d] if d in counted else counted[deepest] + (deepest - d) * step for d in range(num_layers)]


def _median_time(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _training_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer):
    def step() -> None:
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _wrapped_step_s(model: nn.Module, scheme: dict[str, float], batch: dict, repeats: int, options: dict) -> float:
    wrapped = get_pock_model(model, PockConfig(scheme=scheme, **options))
    wrapped.train()
    # lr 0: the optimizer does all its work but changes nothing
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.0)
    try:
        return _median_time(_training_step(wrapped, batch, optimizer), repeats)
    finally:
        wrapped.unload()


def _trained_bytes_per_value(model: nn.Module, scheme: dict[str, float], options: dict) -> int:
    """Bytes of one trained value as the adapter stores it: float32 deltas on a bf16 or fp16 base (PEFT's upcast of
    adapter weights), so not the frozen weights' element size."""
    wrapped = get_pock_model(model, PockConfig(scheme=scheme, **options))
    try:
        return next(p for p in wrapped.parameters() if p.requires_grad).element_size()
    finally:
        wrapped.unload()


def _activation_mb(model: nn.Module, scheme: dict[str, float], batch: dict, options: dict) -> float:
    """MB of the tensors autograd saves for backward in one forward (parameters excluded), with this scheme's cut
    (and checkpointing, as `options` say: a checkpointed layer saves its input through the same hook)."""
    wrapped = get_pock_model(model, PockConfig(scheme=scheme, **options))
    wrapped.train()
    weights = {p.untyped_storage().data_ptr() for p in wrapped.parameters()}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> None:
        # Hold the storage, not the tensor: a saved output held from its own graph node would make a reference
        # cycle that outlives the step (measured: gigabytes per forward), and a freed storage's address could be
        # reused by the next tensor, which would then go uncounted.
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed):
            wrapped(**batch, use_cache=False)
    finally:
        wrapped.unload()
    return sum(storage.nbytes() for storage in storages.values()) / MB


def _full_step_s(model: nn.Module, batch: dict, repeats: int) -> float:
    """A full fine-tuning step's time without a whole optimizer state: every parameter's AdamW update runs on
    temporary moments in its gradient hook, and the gradient is dropped there (lr 0: the weights stay as they are)."""

    @torch.no_grad()
    def adamw_in_hook(parameter: torch.Tensor) -> None:
        gradient = parameter.grad
        first, second = torch.zeros_like(parameter), torch.zeros_like(parameter)
        first.mul_(0.9).add_(gradient, alpha=0.1)
        second.mul_(0.999).addcmul_(gradient, gradient, value=0.001)
        parameter.add_(first / (second.sqrt() + 1e-8), alpha=-0.0)
        parameter.grad = None

    handles = []
    for parameter in model.parameters():
        parameter.requires_grad_(True)
        handles.append(parameter.register_post_accumulate_grad_hook(adamw_in_hook))
    model.train()
    try:
        seconds = _median_time(lambda: model(**batch, use_cache=False).loss.backward(), repeats)
    finally:
        for handle in handles:
            handle.remove()
    return seconds


def _interpolate(measured: dict[int, float], num_layers: int) -> list[float]:
    """A value for every depth (step time, overhead), linear between measured depths (held beyond the ends)."""
    depths = sorted(measured)
    values = []
    for depth in range(num_layers):
        below = max((d for d in depths if d <= depth), default=depths[0])
        above = min((d for d in depths if d >= depth), default=depths[-1])
        if above == below:
            values.append(measured[below])
        else:
            weight = (depth - below) / (above - below)
            values.append(measured[below] * (1 - weight) + measured[above] * weight)
    return values


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
