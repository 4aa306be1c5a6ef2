"""The Pock tuner, registered with PEFT as the method "pock" (PeftType.POCK)."""

from peft.utils import register_peft_method

from .config import PockConfig
from .layer import Linear, PockLayer
from .model import PockModel, UpdatedModule
from .peft_type import POCK_NAME

__all__ = ["Linear", "PockConfig", "PockLayer", "PockModel", "UpdatedModule"]

register_peft_method(name=POCK_NAME, config_cls=PockConfig, model_cls=PockModel, prefix=PockModel.prefix)
