"""`PockTrainer`: `transformers.Trainer` with the engine's optional mechanisms switched on by two arguments.

The label-only loss and the depth cut need nothing: they live in the model `get_pock_model` returns, so a plain
`Trainer` already gets them (TRL's `SFTTrainer` gets the depth cut but computes its own loss; `PockSFTTrainer` in
`sft_trainer.py` gives it the label-only loss). What a trainer has to own is the optimizer step inside backward
(the Trainer calls `optimizer.step()` itself) and attaching a frozen-prefix cache for the run:

    trainer = PockTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0.0), train_dataset=...,
                          data_collator=InstructionCollator(tokenizer.pad_token_id),
                          optimizer_in_backward=True, prefix_cache=PrefixCache(max_mb=2048))
    trainer.train()

With `optimizer_in_backward=True` AdamW (the Trainer's learning rate, betas, epsilon and weight decay; its learning
rate scheduler drives the learning rate) runs from per-parameter hooks during backward; the Trainer's own
`optimizer.step()` then only applies what an accumulation window cut short at the end of an epoch left behind.

Training calls run without a KV cache (`use_cache=False`): training needs none, and padding-free batches
(`InstructionCollator(packed=True)`) get their block-causal mask from transformers only without one.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from .optim_in_backward import OptimizerInBackward
from .prefix_cache import PrefixCache


class StepsInBackward(torch.optim.Optimizer):
    """The optimizer a `Trainer` sees when the real updates happen inside backward.

    Its `param_groups` are the `OptimizerInBackward`'s, so a learning rate scheduler changes the rate of the next
    updates; `step()` flushes a cut-short accumulation window; `zero_grad()` has nothing to do (each gradient is freed
    by its own update); `state_dict()` carries every per-parameter optimizer state, for checkpoints.
    """

    def __init__(self, in_backward: OptimizerInBackward) -> None:
        super().__init__(in_backward.parameters, {"lr": in_backward.param_groups[0]["lr"]})
        self.in_backward = in_backward
        self.param_groups = in_backward.param_groups

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.in_backward.flush()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return self.in_backward.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.in_backward.load_state_dict(state_dict)


class PockTrainer(Trainer):
    """A `transformers.Trainer` that can step the optimizer inside backward and serve a frozen-prefix cache.

    Args:
        optimizer_in_backward: run AdamW from per-parameter hooks during backward, so gradients of different
            modules never coexist. Requires `max_grad_norm=0` (global clipping needs every gradient first) and the
            default optimizer (no `optimizers=` argument).
        prefix_cache: a `PrefixCache` attached to the model for the trainer's lifetime (`model` must come from
            `get_pock_model`). Multi-epoch training then skips the frozen prefix from the second epoch on.
        *args, **kwargs: as for `transformers.Trainer`.

    Raises:
        ValueError: `optimizer_in_backward` with gradient clipping on, or with an optimizer passed in.
    """

    def __init__(
        self,
        *args,
        optimizer_in_backward: bool = False,
        prefix_cache: PrefixCache | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_in_backward = optimizer_in_backward
        if optimizer_in_backward:
            if self.args.max_grad_norm:
                raise ValueError(
                    f"optimizer_in_backward=True with max_grad_norm={self.args.max_grad_norm}: clipping by the global "
                    "gradient norm needs every gradient before any update, which the step inside backward removes. "
                    "Set TrainingArguments(max_grad_norm=0.0), or train without optimizer_in_backward to clip."
                )
            if self.optimizer is not None:
                raise ValueError("optimizer_in_backward=True builds its own AdamW; do not pass `optimizers=`.")
        self.prefix_cache = prefix_cache.attach(self.model) if prefix_cache is not None else None

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, {**inputs, "use_cache": False}, *args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if not self.optimizer_in_backward:
            return super().create_optimizer(model)
        if self.optimizer is None:
            model = self.model if model is None else model
            in_backward = OptimizerInBackward(
                model.parameters(),
                torch.optim.AdamW,
                accumulation_steps=self.args.gradient_accumulation_steps,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                weight_decay=self.args.weight_decay,
            )
            # as the Trainer's own AdamW: no weight decay on biases and norm weights
            decay = set(self.get_decay_parameter_names(model))
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and name not in decay:
                    in_backward.optimizers[parameter].param_groups[0]["weight_decay"] = 0.0
            self.optimizer = StepsInBackward(in_backward)
        return self.optimizer
