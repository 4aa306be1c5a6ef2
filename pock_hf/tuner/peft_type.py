"""The one place where pock_hf extends PEFT's closed `PeftType` enum.

`peft.utils.register_peft_method` only accepts names that are members of `PeftType`, and PEFT ships that enum closed
(tested with peft 0.21). A third-party method therefore has to add its member before registering. Everything that
depends on PEFT's enum internals lives here, and `tests/test_peft_registration.py` fails loudly if a PEFT release
changes the mechanism (for example by opening registration to unknown names, which would make this shim unnecessary).
"""

from __future__ import annotations

import enum

from peft.utils import PeftType

POCK_NAME = "pock"


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add `name = value` to a `str`-valued Enum in place, as if it had been declared in the class body."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(enum_cls, attr):
            raise RuntimeError(
                f"Cannot register the Pock method with PEFT: {enum_cls.__qualname__} has no {attr}. The enum "
                "internals changed (new Python or PEFT release); update pock_hf/tuner/peft_type.py."
            )
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    # type.__setattr__ bypasses EnumType's guard against adding attributes that look like members.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


POCK_PEFT_TYPE = _add_enum_member(PeftType, POCK_NAME.upper(), POCK_NAME.upper())
