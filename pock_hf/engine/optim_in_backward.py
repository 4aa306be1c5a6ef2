"""Optimizer step inside backward: each parameter is updated, and its gradient freed, as soon as it is ready.

PockEngine reorders operators so the update of one layer runs while backward continues below it; gradients of
different layers then never coexist. PyTorch's post-accumulate-grad hooks give the same effect: one optimizer per
parameter, stepped from that parameter's hook. With `accumulation_steps=N` each parameter's gradient accumulates over
N backward passes and is applied (and freed) on the N-th, exactly as the ordinary loop would
(`loss.backward()` N times, then `optimizer.step()`; scale the loss by 1/N as you would there).

Global gradient-norm clipping needs every gradient before any update, which is exactly what this removes, so it is
refused with an error rather than approximated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class OptimizerInBackward:
    """Attach `optimizer_class(**optimizer_kwargs)` to each of `parameters`, stepping inside backward.

    After each backward pass the parameters that received a gradient are updated (every `accumulation_steps`-th
    pass) and their `.grad` is None again. `detach()` removes the hooks.

    Raises:
        ValueError: `max_grad_norm` is given (global clipping cannot run inside backward), no parameter requires
            grad, or `accumulation_steps` < 1.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        **optimizer_kwargs,
    ) -> None:
        if max_grad_norm is not None:
            raise ValueError(
                "max_grad_norm: clipping by the global gradient norm needs every gradient before any update, and the "
                "optimizer step inside backward updates each parameter as soon as its gradient is ready. Train with "
                "the ordinary loop (optimizer.step() after backward) to clip, or drop max_grad_norm."
            )
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}.")
        self.parameters = [p for p in parameters if p.requires_grad]
        if not self.parameters:
            raise ValueError("No parameter requires grad: there is nothing to optimize.")
        self.accumulation_steps = accumulation_steps
        self.optimizers = {p: optimizer_class([p], **optimizer_kwargs) for p in self.parameters}
        # one learning rate for all, read at each update, so a scheduler (or `training.set_learning_rate`) can drive
        # it between steps
        self.param_groups = [{"params": self.parameters, "lr": self.optimizers[self.parameters[0]].defaults["lr"]}]
        self._passes = {p: 0 for p in self.parameters}
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.parameters]

    def _step(self, parameter: nn.Parameter) -> None:
        self._passes[parameter] += 1
        if self._passes[parameter] % self.accumulation_steps == 0:
            self._apply(parameter)

    def _apply(self, parameter: nn.Parameter) -> None:
        optimizer = self.optimizers[parameter]
        optimizer.param_groups[0]["lr"] = self.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def flush(self) -> None:
        """Apply now the updates of gradients still accumulating (an accumulation window cut short, e.g. at the end
        of an epoch), so the next window starts clean — what the ordinary loop's `optimizer.step()` would do."""
        for parameter in self.parameters:
            if parameter.grad is not None:
                self._apply(parameter)
            self._passes[parameter] = 0

    def state_dict(self) -> dict:
        """`{"lr": float, "optimizers": [per-parameter state, in parameter order]}` (for checkpoints)."""
        return {
            "lr": self.param_groups[0]["lr"],
            "optimizers": [self.optimizers[p].state_dict() for p in self.parameters],
        }

    def load_state_dict(self, state: dict) -> None:
        states = state["optimizers"]
        if len(states) != len(self.parameters):
            raise ValueError(f"Expected {len(self.parameters)} optimizer states, got {len(states)}.")
        for parameter, parameter_state in zip(self.parameters, states):
            self.optimizers[parameter].load_state_dict(parameter_state)
        self.param_groups[0]["lr"] = state["lr"]

    def detach(self) -> None:
        """Remove the hooks: backward then leaves gradients in `.grad` as usual."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
