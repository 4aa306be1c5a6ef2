"""`PockConfig`: which linear modules to update, how many of their channels, and how to choose them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft.config import PeftConfig
from safetensors import SafetensorError, safe_open

from ..io.files import read_json_object
from .peft_type import POCK_PEFT_TYPE

CHANNEL_AXES = ("out", "in")
CHANNEL_SELECTIONS = ("first", "magnitude")
FROZEN_QUANTIZATIONS = ("int8", "nf4")


def load_scheme_file(path: str | os.PathLike) -> dict[str, float]:
    """Read a scheme JSON file: either `{module: ratio}` or `{"scheme": {module: ratio}, ...metadata}`.

    The second shape is what the planner writes (it adds predicted gain and cost beside the scheme).
    """
    data = read_json_object(path, "Scheme file")
    return data["scheme"] if isinstance(data.get("scheme"), dict) else data


def validate_scheme(scheme: dict) -> dict[str, float]:
    """Check names and ratios of a scheme; returns it with float ratios. Raises `ValueError` naming the entry."""
    if not scheme:
        raise ValueError(
            "The Pock scheme is empty: give at least one linear module name and its channel ratio in (0, 1], "
            "e.g. {'model.layers.27.mlp.up_proj': 0.25}."
        )
    checked = {}
    for name, ratio in scheme.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Scheme entry {name!r}: module names must be non-empty strings.")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise ValueError(f"Scheme entry {name!r}: ratio {ratio!r} is not a number; valid ratios are in (0, 1].")
        if not 0 < ratio <= 1:
            raise ValueError(f"Scheme entry {name!r}: ratio {ratio!r} is outside (0, 1].")
        checked[name] = float(ratio)
    return checked


@dataclass
class PockConfig(PeftConfig):
    """Configuration of a Pock (sparse channel update) adapter.

    Args:
        scheme (`dict[str, float]` or `str`):
            Full module names of linear layers (e.g. `model.layers.27.mlp.up_proj`) mapped to the ratio of their
            channels to update, in (0, 1]; or a path to a scheme JSON file (read once, at construction).
        channel_axis (`"out"` or `"in"`):
            `"out"` updates whole rows of the weight (output channels); `"in"` updates columns (input channels),
            which also saves only the selected slice of the input activation for backward.
        channel_selection (`"first"` or `"magnitude"`):
            How channels are chosen when `channel_indices` does not name them: the first k, or the k with the largest
            L2 norm of the frozen weight along that axis. The chosen indices are stored in the adapter either way.
        channel_indices (`dict[str, list[int]]`, optional):
            Explicit channel indices per module (e.g. ranked by gradient magnitude on the task); overrides
            `channel_selection` for the modules it names. Their count must equal round(ratio * channels).
        train_norms (`bool`):
            Also train the RMSNorm weights of the decoder layers that hold an updated module (saved through PEFT's
            `modules_to_save`).
        gradient_checkpointing (`bool`):
            Turn on activation checkpointing (non-reentrant) when the adapter is created. Checkpointing never applies
            below the depth cut, whoever turns it on.
        label_only_loss (`bool`):
            When the wrapped model is called with `labels`, compute the LM head and the loss only at labelled
            positions, in chunks of `loss_chunk_size`, so full logits never exist (`.logits` is then None). Same loss
            and gradients as the stock path. Set False to get the stock loss and logits.
        loss_chunk_size (`int` or None):
            Positions per chunk of the label-only loss; at most one chunk's logits (chunk x vocab) exist at a time.
            None (default): as many as keep a chunk's float32 logits within 32 MB (170 positions for a 49k vocabulary),
            since the chunk's logits and their softmax are a step's largest buffers.
        quantize_frozen (`"int8"`, `"nf4"` or None):
            Hold the frozen weights of the decoder layers' linear modules in bitsandbytes 8-bit (LLM.int8) or 4-bit
            NF4, as QLoRA does; the sparse deltas, their optimizer state and gradients stay in full precision. The LM
            head and embeddings stay as they are. Merging dequantizes, adds the delta and quantizes again.
        init_weights (`bool`):
            Start the deltas at zero (the wrapped model equals the base). `False` starts them at small random values,
            for tests only.
        base_model_fingerprint (`dict`, optional):
            Filled in when the adapter is created: model type, sizes and the shapes of the targeted modules. Loading
            the adapter onto a model with another fingerprint is an error.
    """

    scheme: dict[str, float] | str = field(
        default_factory=dict,
        metadata={"help": "Module name -> channel ratio in (0, 1], or a path to a scheme JSON file."},
    )
    channel_axis: Literal["out", "in"] = field(
        default="out", metadata={"help": "'out' updates weight rows, 'in' updates weight columns."}
    )
    channel_selection: Literal["first", "magnitude"] = field(
        default="magnitude",
        metadata={"help": "How to choose channels when channel_indices does not name them: 'first' or 'magnitude'."},
    )
    channel_indices: dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Explicit channel indices per module; overrides channel_selection."}
    )
    train_norms: bool = field(
        default=False, metadata={"help": "Also train the RMSNorm weights of decoder layers with an updated module."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Enable activation checkpointing above the depth cut when wrapping."}
    )
    label_only_loss: bool = field(
        default=True, metadata={"help": "With labels, run the LM head and loss only at labelled positions, chunked."}
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk of the label-only loss (None: logits within 32 MB)."}
    )
    quantize_frozen: Literal["int8", "nf4"] | None = field(
        default=None, metadata={"help": "Quantize the frozen decoder linear weights with bitsandbytes: int8 or nf4."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-initialise the deltas; False gives random deltas (tests only)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules to train and save in full (PEFT's modules_to_save)."}
    )
    base_model_fingerprint: dict | None = field(
        default=None, metadata={"help": "Set on creation: the base model this adapter belongs to."}
    )
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Derived from `scheme`; kept for PEFT's bookkeeping. Do not set."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = POCK_PEFT_TYPE
        if isinstance(self.scheme, (str, os.PathLike)):
            self.scheme = load_scheme_file(self.scheme)
        if not isinstance(self.scheme, dict):
            raise ValueError(
                f"`scheme` must be a dict or a path to a scheme JSON file, got {type(self.scheme).__name__}."
            )
        self.scheme = validate_scheme(self.scheme)
        if self.channel_axis not in CHANNEL_AXES:
            raise ValueError(f"`channel_axis` is {self.channel_axis!r}; valid values are {CHANNEL_AXES}.")
        if self.channel_selection not in CHANNEL_SELECTIONS:
            raise ValueError(
                f"`channel_selection` is {self.channel_selection!r}; valid values are {CHANNEL_SELECTIONS}."
            )
        if self.quantize_frozen is not None and self.quantize_frozen not in FROZEN_QUANTIZATIONS:
            raise ValueError(
                f"`quantize_frozen` is {self.quantize_frozen!r}; valid values are {FROZEN_QUANTIZATIONS} or None."
            )
        if self.loss_chunk_size is not None and (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 1
        ):
            raise ValueError(f"`loss_chunk_size` must be a positive integer or None, got {self.loss_chunk_size!r}.")
        for option in ("train_norms", "gradient_checkpointing", "label_only_loss", "init_weights"):
            if not isinstance(getattr(self, option), bool):
                raise ValueError(f"`{option}` must be true or false, got {getattr(self, option)!r}.")
        self._check_channel_indices()
        self.target_modules = sorted(self.scheme)

    def _check_channel_indices(self) -> None:
        if self.channel_indices is None:
            return
        if not isinstance(self.channel_indices, dict):
            raise ValueError(
                f"`channel_indices` must map module names to lists of channel indices, got "
                f"{type(self.channel_indices).__name__}."
            )
        for name, indices in self.channel_indices.items():
            if name not in self.scheme:
                raise ValueError(f"`channel_indices` names {name!r}, which is not in the scheme.")
            if not isinstance(indices, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices
            ):
                raise ValueError(f"`channel_indices[{name!r}]` must be a list of integer channel indices.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's loader, after checking a local adapter folder (`check_adapter_folder`): a
        damaged, foreign, newer or pickle-only adapter fails naming the file before anything is loaded."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            check_adapter_folder(folder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


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
