"""The systems under evaluation: a base model (the embedded default, a local checkpoint or a hub id), optionally with a
PEFT adapter (a Pock adapter, or LoRA and the rest). Several systems are evaluated one after another, one in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pock_hf.data.default_model import DEFAULT_MODEL, load_model_and_tokenizer
from pock_hf.engine.precision import resolve_dtype


@dataclass(frozen=True)
class System:
    """A model (`None`: the embedded default) with an optional adapter, and the label reports use for it."""

    label: str
    model: str | None = None
    adapter: str | None = None


def make_systems(models: list[str], adapters: list[str]) -> list[System]:
    """Every model alone, then the first model with each adapter (the baseline for comparisons is the first system).

    `"default"` (or no model at all) is the embedded SmolLM2-135M-Instruct. Labels are the last path component (or hub
    id) of the model, `+adapter` for adapters, made unique with a counter when two would be equal.
    """
    models = [None if model in (None, "default", DEFAULT_MODEL) else model for model in (models or [None])]
    systems = [System(_label(model), model) for model in models]
    systems += [System(f"{_label(models[0])}+{_label(adapter)}", models[0], adapter) for adapter in adapters]
    seen: dict[str, int] = {}
    unique = []
    for system in systems:
        seen[system.label] = seen.get(system.label, 0) + 1
        label = system.label if seen[system.label] == 1 else f"{system.label}#{seen[system.label]}"
        unique.append(System(label, system.model, system.adapter))
    return unique


def _label(name: str | None) -> str:
    return DEFAULT_MODEL if name is None else Path(str(name).rstrip("/")).name or str(name)


def load_system(system: System, *, device: str = "cpu", dtype: str = "float32"):
    """`(model, tokenizer)` of `system`, in eval mode on `device`.

    Models load with `trust_remote_code=False`; adapters through `peft.PeftModel.from_pretrained` (importing pock_hf
    registers the Pock method with PEFT), from safetensors only.

    Raises:
        ValueError: unknown dtype, or a local adapter folder without `adapter_model.safetensors`.
    """
    model, tokenizer = load_model_and_tokenizer(system.model, dtype=resolve_dtype(dtype, device).dtype)
    if system.adapter is not None:
        from peft import PeftModel

        import pock_hf  # noqa: F401  (registers PeftType.POCK, so Pock adapters load)
        from pock_hf.tuner.head_input import install_contiguous_head_input

        folder = Path(system.adapter)
        if folder.exists() and not (folder / "adapter_model.safetensors").is_file():
            raise ValueError(
                f"Adapter folder {os.fspath(folder)} has no adapter_model.safetensors (pickled .bin adapters are not "
                "loaded: they can run code)."
            )
        # the adapter freezes the head: batched generation then needs its input contiguous (see head_input)
        install_contiguous_head_input(model)
        model = PeftModel.from_pretrained(model, system.adapter)
    return model.to(device).eval(), tokenizer


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"
