"""`PockSFTTrainer`: TRL's `SFTTrainer` with the model's own loss, so a Pock model trains with its label-only loss.

What a plain `trl.SFTTrainer` (trl 1.16) runs on a Pock model: it adds its own fused LM head to the model
(`trl.trainer.utils.add_fused_lm_head`) and computes the loss from it (`model(**inputs, fused_lm_head=True)`): the
decoder runs as usual (Pock's channel-sparse layers and depth cut are active, checkpointing above the cut only), then
TRL's chunked log-probability kernel projects the last hidden states through `lm_head.weight`. Pock's label-only loss
is never called. TRL's kernel keeps no `[tokens x vocab]` logits either, and the loss equals the stock one, but on
devices without Triton (CPU, MPS) it scores every position, prompt and padding included, and recomputes the logits in
backward; on CUDA/XPU it scores only the labelled positions, as Pock's loss does. TRL also refuses an adapter on
`lm_head` (a scheme entry `"lm_head"`), since its kernel reads the head's weight directly.

`PockSFTTrainer` overrides `compute_loss`, the extension point TRL names for a custom loss, and returns the loss the
model computes itself from its labels, as `transformers.Trainer.compute_loss` does: for a Pock model, the label-only
loss (with `num_items_in_batch`, so gradient accumulation weighs tokens as TRL does). Everything else is
`SFTTrainer`'s: data preparation, chat templates, completion-only labels, packing, saving. It falls back to TRL's own
loss where that one is needed: `loss_type="dft"` (per-token weights), `compute_loss_func` or label smoothing (they
need the logits), MoE auxiliary losses, a parallelism config (sequence/context parallelism), a model without Pock's
label-only loss, and calls that ask for the outputs (evaluation with `prediction_loss_only=False`). Not logged on the
label-only path: TRL's `entropy`, `mean_token_accuracy` and `num_tokens` metrics, which come from TRL's kernel.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer
from trl import SFTTrainer

from ..tuner.config import PockConfig

logger = logging.getLogger(__name__)


def has_pock_label_only_loss(model: nn.Module) -> bool:
    """Whether `model` is a Pock `PeftModel` whose active adapter computes its loss with the label-only loss."""
    if not isinstance(model, PeftModel):
        return False
    config = model.peft_config.get(model.active_adapter)
    base = model.get_base_model()
    return (
        isinstance(config, PockConfig)
        and config.label_only_loss
        and hasattr(base, "get_output_embeddings")
        and base.get_output_embeddings() is not None
    )


class PockSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose training loss is the model's own: for a Pock model, the label-only loss.

    Takes exactly `SFTTrainer`'s arguments. For a model without Pock's label-only loss it is a plain `SFTTrainer`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pock_label_only = has_pock_label_only_loss(self.accelerator.unwrap_model(self.model))
        if self.pock_label_only and not self._model_loss_applies(return_outputs=False):
            logger.warning(
                "PockSFTTrainer: these settings (loss_type=%r, compute_loss_func, label smoothing, MoE auxiliary "
                "loss or a parallelism config) need TRL's own loss; Pock's label-only loss will not run.",
                self.args.loss_type,
            )

    def _model_loss_applies(self, return_outputs: bool) -> bool:
        """Whether the model's own loss (Pock's label-only loss) can stand in for TRL's in this call."""
        return (
            self.pock_label_only
            and not return_outputs  # the caller wants outputs with logits, which only TRL's path rebuilds
            and self.args.loss_type == "nll"
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not getattr(self, "aux_loss_enabled", False)
            and getattr(self.accelerator, "parallelism_config", None) is None
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The model's own loss from `inputs["labels"]` (mean over labelled tokens, or their sum divided by
        `num_items_in_batch`), as `transformers.Trainer` computes it; TRL's loss where `_model_loss_applies` says
        no."""
        if not self._model_loss_applies(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # as SFTTrainer does: the KV cache is useless in training and clashes with gradient checkpointing
        inputs = {**inputs, "use_cache": False}
        # Trainer.compute_loss (SFTTrainer's parent) calls the model with its labels, passes `num_items_in_batch`
        # when the model takes loss kwargs, and scales for `average_tokens_across_devices` as TRL's loss does
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
