"""Wrapping a model with a Pock adapter, and loading a saved one after checking its folder.

`PeftModel.from_pretrained(base, path)` works for Pock adapters as for LoRA, but on a bad folder it gives PEFT's or
safetensors' own errors (a `SafetensorError` "incomplete metadata" that names no file), drops config keys it does
not know with only a warning, and falls back to `adapter_model.bin`, a pickle (which torch >= 2.6 refuses to run,
`weights_only=True`, but with an unhelpful message). `load_pock_adapter` (and `PockConfig.from_pretrained`, which
PEFT's loader calls) check the folder first.
"""

from __future__ import annotations

import copy
import os
import warnings

from peft import PeftModel, get_peft_model
from torch import nn

from .config import PockConfig, check_adapter_folder


def get_pock_model(model: nn.Module, config: PockConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a Pock adapter: freeze every parameter, replace each scheme module with a channel-sparse
    layer, and install the depth cut. Returns a `PeftModel` exposing `cut_layer` and `updated_modules`.

    `config` itself is left as it was (the wrapped model gets a copy that records this base model's fingerprint), so
    one `PockConfig` can wrap several base models, as a `LoraConfig` can.

    Raises:
        ValueError: a scheme entry is not a linear module of `model`, its ratio is outside (0, 1], or the config's
            base-model fingerprint belongs to another model.
    """
    config = copy.deepcopy(config)
    if config.task_type is None and hasattr(model, "generate"):
        config.task_type = "CAUSAL_LM"  # PeftModelForCausalLM: generate() and Trainer work as with LoRA
    with warnings.catch_warnings():
        # PEFT still reads transformers' deprecated `is_gradient_checkpointing`; nothing the user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config, adapter_name=adapter_name)


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
