"""Label-only, chunked LM-head loss: the head and the cross-entropy run only where a label is, a chunk at a time.

Instruction tuning masks the prompt, yet the stock causal-LM loss computes [tokens x vocab] logits for every
position (49,152 columns per token for SmolLM2). Here the hidden states of the positions whose *next* token carries a
label are gathered, and the head + cross-entropy run over them in chunks of `chunk_size` rows, so at most one chunk's
logits exist at a time. The loss is the stock one (mean over labelled tokens, or sum / `num_items_in_batch` when
given) to float tolerance, and so are the gradients.

For a plain `nn.Linear` head the gradients are computed in the forward pass, chunk by chunk, while the chunk's
logits are at hand (softmax minus one-hot, times the head weight): backward then only scales them, and no logits are
computed twice. Any other head (a Pock-updated or `modules_to_save` LM head) runs each chunk under activation
checkpointing instead, which recomputes the chunk's logits in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from .forward_patch import ForwardPatch, patch_forward, unpatch_forward

IGNORE_INDEX = -100
# the default chunk keeps one chunk's float32 logits within this many bytes (at least MIN_CHUNK positions)
CHUNK_LOGITS_BYTES = 32 * 2**20
MIN_CHUNK = 16
# keyword arguments of a causal LM's forward that the decoder stack does not take
HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_items_in_batch", "return_dict")
LOSS_TAG = "_pock_forward_before_label_only_loss"


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


class LinearCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, chunk by chunk, with the gradients of
    `hidden`, `weight` and `bias` (those that need one) computed during forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, chunk_size):
        need_hidden, _, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(chunk, weight, bias).float()  # (chunk, vocab)
            log_normalizer = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(chunk.shape[0], device=chunk.device)
            total += (log_normalizer - logits[rows, chunk_targets]).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d(loss)/d(logits) = softmax - one_hot, built in place over the logits
            grad_logits = logits.sub_(log_normalizer.unsqueeze(1)).exp_()
            grad_logits[rows, chunk_targets] -= 1
            if need_hidden:
                grad_hidden[start : start + chunk_size] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ chunk.float()
            if need_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (next(saved) * grad_total if p else None for p in ctx.present)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.dtypes[1])
        return grad_hidden, None, grad_weight, grad_bias, None


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
    if type(head) is nn.Linear:
        total = LinearCrossEntropySum.apply(hidden, targets, head.weight, head.bias, chunk_size)
        return total / _denominator(num_items_in_batch, targets, total)
    total = hidden.new_zeros((), dtype=torch.float32)
    # a head that trains (a Pock-updated lm_head) needs backward even when nothing below it does
    needs_backward = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    for start in range(0, hidden.shape[0], chunk_size):
        chunk, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if needs_backward:
            # recompute the chunk's logits in backward instead of keeping them
            total = total + checkpoint(_chunk_loss_sum, chunk, chunk_targets, head, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(chunk, chunk_targets, head)
    return total / _denominator(num_items_in_batch, targets, total)


def _denominator(num_items_in_batch, targets: torch.Tensor, total: torch.Tensor):
    denominator = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return denominator.to(total.device) if isinstance(denominator, torch.Tensor) else denominator


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk whose float32 logits fit `CHUNK_LOGITS_BYTES` (at least `MIN_CHUNK`)."""
    return max(MIN_CHUNK, CHUNK_LOGITS_BYTES // (4 * vocab_size))


def install_label_only_loss(model: nn.Module, chunk_size: int | None = None) -> None:
    """Make `model` (a transformers causal LM) compute its loss with `label_only_loss` whenever it is called with
    labels; `.logits` is then None. Calls without labels (generation, evaluation) run the model's own forward.
    `chunk_size` None: `default_chunk_size` of the head's vocabulary."""
    if chunk_size is None:
        chunk_size = default_chunk_size(model.get_output_embeddings().weight.shape[0])
    patch_forward(LabelOnlyLossForward(model, chunk_size))


class LabelOnlyLossForward(ForwardPatch):
    """A causal LM's forward that, given labels, runs its decoder and then `label_only_loss` over its output
    embeddings (both looked up at call time, so a head wrapped after installing is the one used)."""

    tag = LOSS_TAG

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__(model)
        self.chunk_size = chunk_size

    def __call__(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None:
            return self.original()(*args, **kwargs)
        decoder = self.module.get_decoder()
        outputs = decoder(*args, **{k: v for k, v in kwargs.items() if k not in HEAD_ONLY_KWARGS})
        loss = label_only_loss(
            outputs.last_hidden_state,
            labels,
            self.module.get_output_embeddings(),
            chunk_size=self.chunk_size,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )
        return CausalLMOutputWithPast(loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def remove_label_only_loss(model: nn.Module) -> None:
    """Give `model` its own forward back (a no-op if `install_label_only_loss` was not applied)."""
    unpatch_forward(model, LOSS_TAG)
