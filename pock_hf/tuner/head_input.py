"""Hand the output embeddings a contiguous input, so generating from a frozen bf16/fp16 model on a CPU does not
materialise its head once per batch row.

transformers computes the logits of the last position only, as `lm_head(hidden[:, -1:, :])`: a strided view. For a
low-precision weight that does not require grad, torch's CPU `linear` then runs a batched matmul that copies the
shared weight for every row (pytorch/pytorch#151934; measured with torch 2.13 on an AVX512-BF16 CPU: +864 MB for
SmolLM2's 49,152 x 576 bf16 head at 16 rows, +8 MB for the same product on a contiguous copy). Freezing the model is
what exposes it, so every Pock model carries this patch, and the recipe gives it to the baselines it compares against.
The copy it makes is one hidden vector per row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .forward_patch import ForwardPatch, patch_forward, unpatch_forward

HEAD_INPUT_TAG = "_pock_contiguous_head_input"


class ContiguousInputForward(ForwardPatch):
    """A module's forward that first makes a strided tensor input contiguous (values unchanged)."""

    tag = HEAD_INPUT_TAG

    def __call__(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_tensor(hidden) and not hidden.is_contiguous():
            hidden = hidden.contiguous()
        return self.original()(hidden, *args, **kwargs)


def install_contiguous_head_input(model: nn.Module) -> bool:
    """Patch the output embeddings of `model` (a transformers model) to take contiguous inputs; idempotent. Returns
    False where the model has no output embeddings module."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        return False
    patch_forward(ContiguousInputForward(head))
    return True


def remove_contiguous_head_input(model: nn.Module) -> None:
    """Undo `install_contiguous_head_input` (a no-op where it was not applied)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        unpatch_forward(head, HEAD_INPUT_TAG)
