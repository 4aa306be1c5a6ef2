"""The depth cut: no autograd state and no backward below the deepest decoder layer that trains.

Every decoder layer gets a thin forward wrapper that reads a shared `DepthCut` at call time:

- layers below the cut run under `torch.no_grad()`: they record nothing for backward, and transformers' activation
  checkpointing (which only acts when grad is enabled) never wraps them;
- the cut layer's incoming hidden state is detached, so the input gradients that `enable_input_require_grads()`
  forces (PEFT, `Trainer(gradient_checkpointing=True)`) stop there instead of running through the whole model;
- with *reentrant* checkpointing, the cut layer itself runs un-checkpointed: a reentrant checkpoint whose inputs do
  not require grad hands its parameters no gradient (the silent failure users report), and the cut layer's input is
  detached by design. Non-reentrant checkpointing has no such limit and wraps the cut layer too.

Reading the cut at call time (rather than baking it into the wrappers) keeps it right when the set of trainable
parameters changes after wrapping (modules_to_save, a second adapter, `set_adapter`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .forward_patch import ForwardPatch, patch_forward, unpatch_forward

CUT_TAG = "_pock_forward_before_depth_cut"


@dataclass
class DepthCut:
    """Where backward stops. `layer` is the index of the deepest (lowest) decoder layer holding a trainable
    parameter, `num_layers` when none does; `detach_input` is False when something below the decoder stack (e.g. the
    input embeddings) trains and so backward must reach below the first layer."""

    layer: int
    detach_input: bool = True


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack of a Llama-family model: the first `ModuleList` named `layers`, and its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == "layers" and len(module) > 0:
            return name, module
    raise ValueError(
        f"{type(model).__name__} has no decoder stack (a ModuleList named 'layers'); Pock supports Llama-family models."
    )


def layer_index_of(name: str, layers_name: str) -> int | None:
    """Decoder-layer index of a module or parameter name (`<layers_name>.<i>.…`), None if outside the stack."""
    match = re.match(rf"^{re.escape(layers_name)}\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def compute_cut(named_parameters: Iterable[tuple[str, nn.Parameter]], layers_name: str, num_layers: int) -> DepthCut:
    """The cut implied by which parameters train, given in module registration order (`model.named_parameters()`).

    A trainable parameter inside the stack sets the cut layer. One registered before the stack (the input
    embeddings) needs gradients from below the first layer; one after it (final norm, LM head) needs none.
    """
    cut = DepthCut(layer=num_layers)
    seen_stack = False
    for name, parameter in named_parameters:
        index = layer_index_of(name, layers_name)
        seen_stack = seen_stack or index is not None
        if not parameter.requires_grad:
            continue
        if index is not None:
            cut.layer = min(cut.layer, index)
        elif not seen_stack:
            cut.layer, cut.detach_input = 0, False
    return cut


def install_depth_cut(layers: nn.ModuleList, cut: DepthCut) -> None:
    """Wrap each decoder layer's forward so that it obeys `cut` (read at call time). Idempotent."""
    for index, layer in enumerate(layers):
        patch_forward(CutForward(layer, index, cut))


def remove_depth_cut(layers: nn.ModuleList) -> None:
    """Restore every layer's own forward."""
    for layer in layers:
        unpatch_forward(layer, CUT_TAG)


class CutForward(ForwardPatch):
    """Decoder layer `index`'s forward under the depth cut `cut`, which all the layers of a model share with the
    tuner (so deepcopy gives a copy whose layers share the copy's cut)."""

    tag = CUT_TAG

    def __init__(self, layer: nn.Module, index: int, cut: DepthCut) -> None:
        super().__init__(layer)
        self.index = index
        self.cut = cut

    def __call__(self, *args, **kwargs):
        forward = self.original()
        if self.index < self.cut.layer:
            with torch.no_grad():
                return forward(*args, **kwargs)
        if self.index == self.cut.layer and self.cut.detach_input:
            args, kwargs = _detach_hidden_states(args, kwargs)
            if _checkpoints_reentrant(self.module):
                with _checkpointing_disabled(self.module):
                    return forward(*args, **kwargs)
        return forward(*args, **kwargs)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any module of `model` has transformers' activation checkpointing turned on."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Turn transformers' activation checkpointing on (non-reentrant, which the depth cut wraps whole) or off, through
    `activation_checkpointing_enable/disable` where this transformers has them, else the older `gradient_...` names
    (deprecated from transformers 5.x)."""
    if enable:
        method = getattr(model, "activation_checkpointing_enable", None)
        if method is not None:
            method(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


@contextlib.contextmanager
def checkpointing_restored(model: nn.Module, allow: bool) -> Iterator[None]:
    """Within: `model`'s checkpointing off unless `allow` (a Pock wrap with `gradient_checkpointing` turns it on
    itself), so work inside runs as asked, not as the model was left; after: the model's own setting back."""
    was_checkpointing = is_checkpointing(model)
    if was_checkpointing and not allow:
        set_checkpointing(model, False)
    try:
        yield
    finally:
        if is_checkpointing(model) != was_checkpointing:
            set_checkpointing(model, was_checkpointing)


def _detach_hidden_states(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:
        return (args[0].detach(), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
    raise TypeError("Decoder layer called without hidden states; cannot apply the Pock depth cut.")


def _checkpoints_reentrant(layer: nn.Module) -> bool:
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()):
        return False
    func = getattr(layer, "_gradient_checkpointing_func", None)
    # transformers binds the checkpoint kwargs with functools.partial; torch's own default is reentrant
    return bool(getattr(func, "keywords", {}).get("use_reentrant", True))


@contextlib.contextmanager
def _checkpointing_disabled(layer: nn.Module) -> Iterator[None]:
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        layer.gradient_checkpointing = True
