"""What base model an adapter (or table) belongs to: architecture sizes plus the shapes of the modules it touches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch
from torch import nn

ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def architecture_fingerprint(model: nn.Module, module_names: Iterable[str]) -> dict:
    """`{"config": {...}, "shapes": {module: [out, in]}, "digest": str}` for the given linear modules of `model`."""
    config = getattr(model, "config", None)
    architecture = {key: getattr(config, key, None) for key in ARCHITECTURE_KEYS}
    shapes = {}
    for name in sorted(module_names):
        module = model.get_submodule(name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        # the logical [out, in], not weight.shape, which quantized weights pack differently
        shapes[name] = [base.out_features, base.in_features]
    canonical = json.dumps({"config": architecture, "shapes": shapes}, sort_keys=True)
    return {"config": architecture, "shapes": shapes, "digest": hashlib.sha256(canonical.encode()).hexdigest()[:16]}


def check_fingerprint(expected: dict, actual: dict, what: str = "adapter") -> None:
    """Raise `ValueError` if `actual` (the model at hand) differs from `expected` (what the `what` was made for).

    A differing module shape is named with both shapes; otherwise the differing architecture fields and both
    digests are named.
    """
    if expected.get("digest") == actual.get("digest"):
        return
    for name, shape in expected.get("shapes", {}).items():
        found = actual.get("shapes", {}).get(name)
        if found is not None and list(found) != list(shape):
            raise ValueError(
                f"This {what} was made for a base model whose {name!r} weight is {shape}, but the given model's is "
                f"{found}: load it onto the base model it was trained on."
            )
    differing = {
        key: (value, actual.get("config", {}).get(key))
        for key, value in expected.get("config", {}).items()
        if actual.get("config", {}).get(key) != value
    }
    raise ValueError(
        f"This {what} was made for another base model (fingerprint {expected.get('digest')}, the given model has "
        f"{actual.get('digest')}; differing config fields as (expected, given): {differing}). Load it onto the base "
        "model it was trained on."
    )


def weights_digest(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """A digest of the model's parameters: name, shape, dtype and an evenly strided sample of each tensor's values.

    Sampling keeps it to a fraction of a second even for 7B-class models, while any retraining, another checkpoint
    or another initialisation changes it in practice.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].to(device="cpu", dtype=torch.float32)
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict:
    """`{"config": {...}, "weights": str, "digest": str}`: the architecture plus a digest of the weights."""
    config = getattr(model, "config", None)
    architecture = {key: getattr(config, key, None) for key in ARCHITECTURE_KEYS}
    weights = weights_digest(model)
    canonical = json.dumps({"config": architecture, "weights": weights}, sort_keys=True)
    return {"config": architecture, "weights": weights, "digest": hashlib.sha256(canonical.encode()).hexdigest()[:16]}


def check_model_fingerprint(expected: dict, actual: dict, what: str) -> None:
    """Raise `ValueError` naming both fingerprints when `what` (a table, a cost profile) was made on another model."""
    if expected.get("digest") != actual.get("digest"):
        raise ValueError(
            f"This {what} was measured on another model (fingerprint {expected.get('digest')}, weights "
            f"{expected.get('weights')}); the given model has fingerprint {actual.get('digest')}, weights "
            f"{actual.get('weights')}. Measure it again on this model."
        )
