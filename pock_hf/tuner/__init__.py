"""The adapter, registered with PEFT as the method "pock" (PeftType.POCK), and what it installs on the model: the
channel-sparse layer and its backward, the depth cut, the label-only loss, quantized frozen weights and the base-model
fingerprint. It may import `pock_hf.io` only."""

from peft.utils import register_peft_method

from .config import PockConfig
from .layer import Linear, PockLayer
from .mapping import get_pock_model, load_pock_adapter
from .model import PockModel, UpdatedModule
from .peft_type import POCK_NAME

__all__ = ["Linear", "PockConfig", "PockLayer", "PockModel", "UpdatedModule", "get_pock_model", "load_pock_adapter"]

register_peft_method(name=POCK_NAME, config_cls=PockConfig, model_cls=PockModel, prefix=PockModel.prefix)
