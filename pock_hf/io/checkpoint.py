"""Training checkpoints: written atomically, the last N kept, the newest complete one found again, resumed exactly.

A checkpoint is a folder `checkpoint-<step>` holding what a run needs to continue bit for bit:

    trainable.safetensors   the trainable parameters by name (Pock deltas, LoRA matrices, or all weights)
    adapter/                the adapter as `save_pretrained` writes it (Pock, LoRA), to rebuild the model on resume
    optimizer.safetensors   every tensor of the optimizer state (AdamW moments, step counts)
    optimizer.json          the rest of the optimizer state, tensors replaced by {"__tensor__": key}
    state.json              the step counter, data position, RNG states (torch, CUDA, Python) and the loss history
    COMPLETE                written last: a folder without it is ignored

It is written to `<dir>/.tmp-checkpoint-<step>`, fsynced, and renamed with `os.replace`, so a run killed at any moment
leaves either a complete checkpoint or a temporary folder that `latest_checkpoint` ignores. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .files import read_json_object

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
STATE_FORMAT_VERSION = 1


# --- tensors in nested state, without pickle -------------------------------------------------------------------------


def split_tensors(value, tensors: dict[str, torch.Tensor], path: str = "t"):
    """`value` (nested dicts, lists, scalars, tensors) with each tensor moved into `tensors` under a path key and
    replaced by `{"__tensor__": key}`; dicts become `{"__dict__": [[key, value], ...]}` (so int keys stay ints) and
    tuples `{"__tuple__": [...]}`, so JSON gives back exactly what went in."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {
            "__dict__": [[key, split_tensors(item, tensors, f"{path}.{key}")] for key, item in value.items()],
        }
    if isinstance(value, (list, tuple)):
        items = [split_tensors(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    return value


def join_tensors(value, tensors: dict[str, torch.Tensor]):
    """The inverse of `split_tensors`."""
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {key: join_tensors(item, tensors) for key, item in value["__dict__"]}
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(join_tensors(item, tensors) for item in value["__tuple__"])
    if isinstance(value, list):
        return [join_tensors(item, tensors) for item in value]
    return value


# --- RNG states -----------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Torch (CPU and every CUDA device) and Python RNG states as JSON-able lists."""
    state = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# --- writing ---------------------------------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name (tied parameters once)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer_state: dict,
    state: dict,
    save_adapter: Callable[[Path], None] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `checkpoint-<step>` under `directory` atomically and return its path; then delete all but the newest
    `keep` complete checkpoints. `state` (JSON-able: step counter, data position, losses ...) is stored with the RNG
    states added; `save_adapter(folder)` writes the adapter files (e.g. `model.save_pretrained`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step}"
    staging = directory / f".tmp-checkpoint-{step}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(trainable_state(model), staging / "trainable.safetensors")
    if save_adapter is not None:
        save_adapter(staging / "adapter")
    tensors: dict[str, torch.Tensor] = {}
    structure = split_tensors(optimizer_state, tensors)
    save_file(tensors, staging / "optimizer.safetensors")
    _write(staging / "optimizer.json", json.dumps(structure))
    full_state = {"format_version": STATE_FORMAT_VERSION, "step": step, **state, "rng": rng_state()}
    _write(staging / "state.json", json.dumps(full_state))
    _write(staging / COMPLETE_MARKER, "")
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)
    shutil.rmtree(final, ignore_errors=True)  # a complete checkpoint of the same step from an earlier attempt
    os.replace(staging, final)
    _fsync(directory)
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    return final


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- finding and reading ---------------------------------------------------------------------------------------------


def is_complete(path: Path) -> bool:
    return path.is_dir() and CHECKPOINT_PATTERN.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `directory`, oldest (lowest step) first; temporary and incomplete ones are left out."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if is_complete(path)]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `directory`, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """`(trainable parameters by name, optimizer state, state)` of a checkpoint; the caller restores them and calls
    `set_rng_state(state["rng"])` last.

    Raises:
        ValueError: `path` is not a complete checkpoint, or its state has another format version.
    """
    path = Path(path)
    if not is_complete(path):
        raise ValueError(
            f"{path} is not a complete checkpoint folder (checkpoint-<step> with a {COMPLETE_MARKER} file)."
        )
    state = read_json_object(path / "state.json", "Checkpoint state")
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format_version')!r} is not {STATE_FORMAT_VERSION}.")
    structure = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
    optimizer_state = join_tensors(structure, load_file(path / "optimizer.safetensors"))
    return load_file(path / "trainable.safetensors"), optimizer_state, state


def restore_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable parameters into `model` (in place, so optimizers keep their references).

    Raises:
        ValueError: the checkpoint and the model's trainable parameters differ in names or shapes.
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(tensors):
        missing, extra = sorted(set(parameters) - set(tensors)), sorted(set(tensors) - set(parameters))
        raise ValueError(
            f"The checkpoint does not match the model's trainable parameters (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): resume with the config that wrote it."
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.shape != tensors[name].shape:
                raise ValueError(
                    f"Checkpoint tensor {name!r} is {list(tensors[name].shape)}, the model's is "
                    f"{list(parameter.shape)}."
                )
            parameter.copy_(tensors[name])
