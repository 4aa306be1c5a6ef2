"""Checked loading of saved Pock adapters: only JSON and safetensors are read, and a damaged, foreign or newer file
fails with a message that names it, before PEFT touches the base model.

`PeftModel.from_pretrained(base, path)` works for Pock adapters as for LoRA, but on a bad folder it gives PEFT's or
safetensors' own errors (a `SafetensorError` "incomplete metadata" that names no file), drops config keys it does
not know with only a warning, and falls back to `adapter_model.bin`, a pickle (which torch >= 2.6 refuses to run,
`weights_only=True`, but with an unhelpful message). `load_pock_adapter` checks the folder first.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError, safe_open
from torch import nn

from .files import read_json_object
from .tuner import PockConfig
from .tuner.peft_type import POCK_PEFT_TYPE

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def check_adapter_folder(path: str | os.PathLike) -> None:
    """Check a saved Pock adapter folder without loading it.

    Raises:
        ValueError: naming the file, when the folder or its `adapter_config.json` is missing or not a JSON object;
            the adapter is not a Pock adapter; its config has keys this pock_hf does not know (written by a newer
            version: PEFT would drop them and load something other than what was saved); it records no base-model
            fingerprint; the weights exist only as a pickle (`adapter_model.bin`), which pock_hf never reads; or
            `adapter_model.safetensors` is missing, damaged or cut short.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"Adapter folder {os.fspath(path)!r} does not exist (or is not a folder).")
    config = read_json_object(folder / CONFIG_NAME, "Adapter config")
    source = os.fspath(folder / CONFIG_NAME)
    peft_type = config.get("peft_type")
    if peft_type != POCK_PEFT_TYPE.value:
        raise ValueError(f"{source}: peft_type is {peft_type!r}, not {POCK_PEFT_TYPE.value!r}: not a Pock adapter.")
    known = [field.name for field in dataclasses.fields(PockConfig)]
    unknown = sorted(key for key in config if key not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{source}: unknown config key(s) {unknown}{hint}. It was probably saved by a newer pock_hf: upgrade "
            "pock_hf to load it."
        )
    if not isinstance(config.get("base_model_fingerprint"), dict):
        raise ValueError(
            f"{source}: no base_model_fingerprint, so the adapter cannot be checked against the base model it is "
            "loaded onto. Save it again with pock_hf (get_pock_model records the fingerprint)."
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [name for name in PICKLE_WEIGHTS_NAMES if (folder / name).exists()]
        found = (
            f" It holds {pickles[0]}, a pickle, which pock_hf never reads (a pickle can run code)." if pickles else ""
        )
        raise ValueError(f"Adapter folder {os.fspath(folder)!r} has no {WEIGHTS_NAME}.{found}")
    try:
        with safe_open(weights, framework="pt") as tensors:  # reads and checks the header only
            names = list(tensors.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{os.fspath(weights)} is damaged or cut short (an interrupted copy or download?): {error}"
        ) from None
    if not names:
        raise ValueError(f"{os.fspath(weights)} holds no tensors.")


def load_pock_adapter(base: nn.Module, path: str | os.PathLike, **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained(base, path, **kwargs)` after `check_adapter_folder(path)`.

    Raises:
        ValueError: naming the adapter folder or file: everything `check_adapter_folder` checks, and an adapter made
            for another base model (both fingerprints named) or whose modules `base` does not have.
    """
    check_adapter_folder(path)
    try:
        return PeftModel.from_pretrained(base, os.fspath(path), **kwargs)
    except ValueError as error:
        raise ValueError(f"Adapter {os.fspath(path)!r}: {error}") from error
