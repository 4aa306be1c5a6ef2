"""The on-device cost of a Pock scheme: measured step time and memory per cut depth, plus per-unit extras.

A scheme's cost is dominated by its cut: everything above the deepest updated layer runs backward. The profile
measures, on the device that will train, a training step for every cut depth (with a minimal trainable unit at that
layer) and the extra time of updating each module type in full; memory is counted exactly where it can be
(weights, the activations autograd saves above the cut, and per-unit parameter + gradient + AdamW state).
"""

from __future__ import annotations

import json
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

from ..io.files import atomic_write_text, check_format_version, dataclass_from_json, read_json_object
from ..tuner import PockConfig, get_pock_model
from ..tuner.depth_cut import find_decoder_layers
from ..tuner.fingerprint import check_model_fingerprint, model_fingerprint
from ..tuner.sparse_backward import channel_count
from .sensitivity import layer_module_paths
from .table import WHOLE_LAYER

COSTS_FORMAT_VERSION = 1
MB = 2**20
# a trained value costs its parameter, its gradient and AdamW's two moments
TRAINED_VALUE_COPIES = 4

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
    scales linearly with the ratio. `module_shapes[module]` is its weight's [out, in].
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
    settings: dict = field(default_factory=dict)
    format_version: int = COSTS_FORMAT_VERSION

    def modules_of(self, module: str) -> list[str]:
        return list(self.module_shapes) if module == WHOLE_LAYER else [module]

    def unit_memory_mb(self, module: str, ratio: float, axis: str = "out") -> float:
        """Memory (MB) of updating `module` (or `"*"`) at `ratio`: parameter, gradient and AdamW state."""
        values = 0
        for name in self.modules_of(module):
            out_features, in_features = self.module_shapes[name]
            channels, width = (out_features, in_features) if axis == "out" else (in_features, out_features)
            values += channel_count(ratio, channels) * width
        return values * self.bytes_per_value * TRAINED_VALUE_COPIES / MB

    def unit_time_s(self, module: str, ratio: float) -> float:
        """Extra step time (s) of updating `module` (or `"*"`) at `ratio`."""
        return sum(self.unit_extra_s[name] for name in self.modules_of(module)) * ratio

    def base_memory_mb(self, cut: int) -> float:
        """Memory (MB) of a step with cut `cut`, before the units' own memory: weights plus saved activations."""
        return self.weights_mb + self.activation_mb_by_cut[cut]

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
        if self.num_layers < 1 or self.batch_size < 1 or self.seq_len < 1 or self.bytes_per_value < 1:
            raise ValueError(f"{source}: num_layers, batch_size, seq_len and bytes_per_value must be positive.")
        for name in ("step_s_by_cut", "activation_mb_by_cut"):
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
    seed: int = 0,
    progress: bool = True,
) -> CostProfile:
    """Measure a `CostProfile` of `model` (plain, unwrapped) on the device it is on.

    A step is forward + backward + AdamW step on a random batch of `batch_size` x `seq_len` tokens (all labelled).
    Step time is the median of `repeats` timed steps after one warm-up. Cut depths not in `depths` (default: about
    eight depths spread over the stack, always including the first and last layer) are interpolated linearly;
    activation memory is counted for every depth from the tensors autograd saves (exact, device-independent), and on
    CUDA the peak allocated memory is recorded in `settings` too. `measure_full` also times a full fine-tuning step,
    the reference of `budget_time_ratio`; without it the cut-0 step stands in.
    """
    layers_name, stack = find_decoder_layers(model)
    num_layers = len(stack)
    layer_modules = layer_module_paths(model, layers_name, modules)
    if depths is None:
        depths = sorted({round(i * (num_layers - 1) / 7) for i in range(8)})
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "labels": input_ids}
    fingerprint = model_fingerprint(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        with torch.no_grad():
            forward_s = _median_time(lambda: model(**batch), repeats)
        measured = {}
        for depth in tqdm(depths, desc="profiling cut depths", disable=not progress):
            scheme = {f"{layers_name}.{depth}.{layer_modules[0]}": 1e-9}  # one channel: the cut, nothing more
            measured[depth] = _wrapped_step_s(model, scheme, batch, repeats)
        activation_mb = []
        for depth in range(num_layers):
            scheme = {f"{layers_name}.{depth}.{layer_modules[0]}": 1e-9}
            activation_mb.append(_activation_mb(model, scheme, batch))
        top = num_layers - 1
        unit_extra_s = {}
        for module in tqdm(layer_modules, desc="profiling module updates", disable=not progress):
            full_module = _wrapped_step_s(model, {f"{layers_name}.{top}.{module}": 1.0}, batch, repeats)
            unit_extra_s[module] = max(0.0, full_module - measured.get(top, min(measured.values())))
        full_step_s = _full_step_s(model, batch, repeats) if measure_full else None
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        model.train(was_training)
    step_s_by_cut = _interpolate(measured, num_layers)
    # a deeper cut never costs more: smooth out timing noise so the planner's cost model is monotone
    for depth in range(num_layers - 2, -1, -1):
        step_s_by_cut[depth] = max(step_s_by_cut[depth], step_s_by_cut[depth + 1])
    first = model.get_submodule(f"{layers_name}.0")
    settings = {"depths_measured": list(depths), "repeats": repeats, "seed": seed, "labels": "all tokens"}
    if device.type == "cuda":
        settings["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return CostProfile(
        device=_device_name(device),
        model_fingerprint=fingerprint,
        batch_size=batch_size,
        seq_len=seq_len,
        num_layers=num_layers,
        weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / MB,
        forward_s=forward_s,
        full_step_s=full_step_s if full_step_s is not None else step_s_by_cut[0],
        step_s_by_cut=step_s_by_cut,
        activation_mb_by_cut=activation_mb,
        module_shapes={m: list(first.get_submodule(m).weight.shape) for m in layer_modules},
        unit_extra_s=unit_extra_s,
        bytes_per_value=next(model.parameters()).element_size(),
        settings=settings,
    )


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
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _wrapped_step_s(model: nn.Module, scheme: dict[str, float], batch: dict, repeats: int) -> float:
    wrapped = get_pock_model(model, PockConfig(scheme=scheme, channel_selection="first"))
    wrapped.train()
    # lr 0: the optimizer does all its work but changes nothing
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.0)
    try:
        return _median_time(_training_step(wrapped, batch, optimizer), repeats)
    finally:
        wrapped.unload()


def _activation_mb(model: nn.Module, scheme: dict[str, float], batch: dict) -> float:
    """MB of the tensors autograd saves for backward in one forward (parameters excluded), with this scheme's cut."""
    wrapped = get_pock_model(model, PockConfig(scheme=scheme, channel_selection="first"))
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
            wrapped(**batch)
    finally:
        wrapped.unload()
    return sum(storage.nbytes() for storage in storages.values()) / MB


def _full_step_s(model: nn.Module, batch: dict, repeats: int) -> float:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # the full step's cost, the weights untouched
    seconds = _median_time(_training_step(model, batch, optimizer), repeats)
    model.zero_grad(set_to_none=True)
    return seconds


def _interpolate(measured: dict[int, float], num_layers: int) -> list[float]:
    """Step time for every depth, linear between measured depths (held constant beyond the ends)."""
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
