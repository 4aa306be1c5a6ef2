"""Replacing a module's forward on the instance, reversibly (the depth cut and the label-only loss both do)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def patch_forward(module: nn.Module, tag: str, make_forward: Callable[[Callable], Callable]) -> None:
    """Set `module.forward = make_forward(current forward)`, remembering under `tag` what to restore. Patching again
    with the same tag first restores, so it never stacks."""
    unpatch_forward(module, tag)
    # an instance-level forward already there (e.g. accelerate's device hooks) is kept, wrapped, and put back later
    previous = module.__dict__.get("forward")
    new_forward = make_forward(module.forward)
    module.__dict__[tag] = previous
    module.forward = new_forward


def unpatch_forward(module: nn.Module, tag: str) -> None:
    """Undo `patch_forward(module, tag, ...)`; a no-op when it was not applied."""
    if tag not in module.__dict__:
        return
    previous = module.__dict__.pop(tag)
    if previous is None:
        del module.forward
    else:
        module.forward = previous
