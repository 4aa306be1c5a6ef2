"""Replacing a module's forward on the instance, reversibly (the depth cut, the label-only loss and the prefix cache).

The replacement is a `ForwardPatch` object, not a closure: it keeps its module and its state (a `DepthCut`, a layer
index, a chunk size) as attributes and looks the forward it wraps up at call time. `copy.deepcopy` of a patched model
then maps all of it through its memo, so the copy's patched forwards run the copy's modules and share the copy's
state objects; a closure would be copied as is and keep running the original's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn


class ForwardPatch:
    """A module's replacement forward. Subclasses set `tag` (the module attribute under which `patch_forward` keeps
    what to restore) and implement `__call__`, calling `self.original()` for the forward they wrap.

    Contract: everything a patch needs is an attribute of the patch (so that deepcopy maps it), and nothing about the
    wrapped forward is captured at patch time."""

    tag: ClassVar[str]

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def original(self) -> Callable:
        """The forward this patch wraps: an instance-level forward that was there before (e.g. accelerate's device
        hook, or another patch), else the class's forward bound to the module."""
        previous = self.module.__dict__.get(self.tag)
        return previous if previous is not None else type(self.module).forward.__get__(self.module)

    @property
    def __wrapped__(self) -> Callable:
        # what functools.wraps would set: inspect.signature follows it, so Trainer (which keeps the dataset columns
        # the forward names) and generate() (which checks its kwargs against it) see the module's own signature
        return self.original()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def patch_forward(patch: ForwardPatch) -> None:
    """Set `patch.module.forward = patch`, remembering under `patch.tag` what to restore. Patching again with the
    same tag first restores, so patches of one tag never stack."""
    module = patch.module
    unpatch_forward(module, patch.tag)
    # an instance-level forward already there (e.g. accelerate's device hooks) is kept, wrapped, and put back later
    module.__dict__[patch.tag] = module.__dict__.get("forward")
    module.forward = patch


def unpatch_forward(module: nn.Module, tag: str) -> None:
    """Undo the patch applied under `tag`; a no-op when none was."""
    if tag not in module.__dict__:
        return
    previous = module.__dict__.pop(tag)
    if previous is None:
        del module.forward
    else:
        module.forward = previous
