"""What base model an adapter (or table) belongs to: architecture sizes plus the shapes of the modules it touches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

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
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        shapes[name] = list(weight.shape)
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
