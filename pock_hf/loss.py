"""Label-only, chunked LM-head loss: the head and the cross-entropy run only where a label is, a chunk at a time.

Instruction tuning masks the prompt, yet the stock causal-LM loss computes [tokens x vocab] logits for every
position (49,152 columns per token for SmolLM2). Here the hidden states of the positions whose *next* token carries a
label are gathered, and the head + cross-entropy run over them in chunks of `chunk_size` rows, each chunk under
activation checkpointing, so at most one chunk's logits exist at a time, in forward and in backward. The loss is the
stock one (mean over labelled tokens, or sum / `num_items_in_batch` when given) to float tolerance, and so are the
gradients.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from .forward_patch import patch_forward, unpatch_forward

IGNORE_INDEX = -100
# keyword arguments of a causal LM's forward that the decoder stack does not take
HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_items_in_batch", "return_dict")
LOSS_TAG = "_pock_forward_before_label_only_loss"


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def label_only_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    *,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal-LM loss from the decoder's last hidden states (B, T, H) and labels (B, T), shifted as transformers
    does (position t predicts label t+1), computed only where a label is, `chunk_size` positions at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}.")
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX  # (B, T-1)
    hidden = hidden_states[:, :-1][where]  # (N, H): only the positions that predict a label
    targets = targets[where].to(hidden.device)  # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and chunk.requires_grad:
            # recompute the chunk's logits in backward instead of keeping them
            total = total + checkpoint(_chunk_loss_sum, chunk, chunk_targets, head, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(chunk, chunk_targets, head)
    denominator = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def install_label_only_loss(model: nn.Module, chunk_size: int = 1024) -> None:
    """Make `model` (a transformers causal LM) compute its loss with `label_only_loss` whenever it is called with
    labels; `.logits` is then None. Calls without labels (generation, evaluation) run the model's own forward."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder()

    def make_forward(original):
        @functools.wraps(original)
        def forward(*args, **kwargs):
            labels = kwargs.get("labels")
            if labels is None:
                return original(*args, **kwargs)
            outputs = decoder(*args, **{k: v for k, v in kwargs.items() if k not in HEAD_ONLY_KWARGS})
            loss = label_only_loss(
                outputs.last_hidden_state,
                labels,
                head,
                chunk_size=chunk_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
            return CausalLMOutputWithPast(
                loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )

        return forward

    patch_forward(model, LOSS_TAG, make_forward)


def remove_label_only_loss(model: nn.Module) -> None:
    """Give `model` its own forward back (a no-op if `install_label_only_loss` was not applied)."""
    unpatch_forward(model, LOSS_TAG)
