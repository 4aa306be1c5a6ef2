"""One training step the plain-PyTorch way (what the recipes run): token-weighted gradient accumulation over
micro-batches, optional gradient clipping, and either an ordinary optimizer or the optimizer step inside backward.

The model is whatever the caller trains: a Pock-wrapped model (its label-only loss and depth cut apply on their own),
a PEFT LoRA model or a plain transformers model, so the baselines run through the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.instructions import real_token_count
from ..tuner.loss import IGNORE_INDEX
from .optim_in_backward import OptimizerInBackward

AnyOptimizer = torch.optim.Optimizer | OptimizerInBackward


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    in_backward: bool = False,
    accumulation_steps: int = 1,
) -> AnyOptimizer:
    """AdamW over the trainable parameters of `model`; with `in_backward=True`, stepped inside backward (every
    `accumulation_steps`-th backward pass), which frees each gradient as soon as it is used.

    Raises:
        ValueError: nothing in `model` requires grad.
    """
    parameters = trainable_parameters(model)
    if not parameters:
        raise ValueError("No parameter of the model requires grad: there is nothing to optimize.")
    kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": betas}
    if in_backward:
        return OptimizerInBackward(parameters, torch.optim.AdamW, accumulation_steps=accumulation_steps, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def set_learning_rate(optimizer: AnyOptimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (for a schedule driven by the training loop)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def labelled_token_count(batch: dict) -> int:
    """Positions whose next token carries a label: what the causal-LM loss averages over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step saw: `loss` is the mean over its labelled tokens (nats/token); `tokens` counts the
    non-padding input tokens of all micro-batches; `grad_norm` is the pre-clipping norm when clipping ran."""

    loss: float
    labelled_tokens: int
    tokens: int
    grad_norm: float | None = None


def training_step(
    model: nn.Module,
    micro_batches: Sequence[dict],
    optimizer: AnyOptimizer,
    *,
    max_grad_norm: float | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    clip_grad_norm: Callable[..., torch.Tensor] | None = None,
) -> StepStats:
    """Forward and backward every micro-batch (padded or packed, see `InstructionCollator`), then update the
    parameters once.

    The loss of each micro-batch is its summed token loss divided by the labelled tokens of the whole step
    (`num_items_in_batch`, as `transformers.Trainer` does), so the update equals one step on the concatenated batch
    whatever the split. `backward` and `clip_grad_norm` default to PyTorch's; pass `accelerator.backward` and
    `accelerator.clip_grad_norm_` under accelerate.

    Raises:
        ValueError: no micro-batch; no labelled token in the step; `optimizer` steps inside backward but its
            `accumulation_steps` differs from the number of micro-batches, or `max_grad_norm` is given with it
            (global clipping needs every gradient before any update).
    """
    if not micro_batches:
        raise ValueError("training_step needs at least one micro-batch.")
    if isinstance(optimizer, OptimizerInBackward):
        if optimizer.accumulation_steps != len(micro_batches):
            raise ValueError(
                f"The optimizer steps inside backward every {optimizer.accumulation_steps} backward passes, but this "
                f"step has {len(micro_batches)} micro-batches; build it with accumulation_steps={len(micro_batches)}."
            )
        if max_grad_norm is not None:
            raise ValueError(
                "max_grad_norm cannot be used with the optimizer step inside backward: clipping by the global norm "
                "needs every gradient before any update. Drop one of the two."
            )
    labelled = sum(labelled_token_count(batch) for batch in micro_batches)
    if labelled == 0:
        raise ValueError("No labelled token in this step (every label is -100): there is nothing to learn from.")
    backward = backward or torch.Tensor.backward
    total = 0.0
    for batch in micro_batches:
        # no KV cache: training needs none, and packed rows get their block-causal mask only without one
        loss = model(**batch, num_items_in_batch=labelled, use_cache=False).loss
        backward(loss)
        total += loss.item()
    grad_norm = None
    if not isinstance(optimizer, OptimizerInBackward):
        if max_grad_norm is not None:
            clip = clip_grad_norm or torch.nn.utils.clip_grad_norm_
            grad_norm = float(clip(trainable_parameters(model), max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = sum(real_token_count(batch) for batch in micro_batches)
    return StepStats(loss=total, labelled_tokens=labelled, tokens=tokens, grad_norm=grad_norm)
