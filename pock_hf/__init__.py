"""pock_hf: PockEngine-style sparse fine-tuning for Hugging Face Llama-family models.

Measure which layers and channels matter, update only those, and run no backward below the deepest updated layer.
"""

import warnings

from peft import PeftModel, get_peft_model
from torch import nn

from .costs import CostProfile, profile_costs
from .optim_in_backward import OptimizerInBackward
from .planner import Plan, make_plan, plan_scheme
from .prefix_cache import PrefixCache
from .safe_loading import load_pock_adapter
from .sensitivity import gradient_channel_indices, measure_sensitivity
from .table import SensitivityRow, SensitivityTable
from .trainer import PockTrainer
from .training import StepStats, make_optimizer, training_step
from .tuner import PockConfig, PockModel, UpdatedModule

__all__ = [
    "CostProfile",
    "OptimizerInBackward",
    "Plan",
    "PockConfig",
    "PockModel",
    "PockTrainer",
    "PrefixCache",
    "SensitivityRow",
    "SensitivityTable",
    "StepStats",
    "UpdatedModule",
    "get_pock_model",
    "gradient_channel_indices",
    "load_pock_adapter",
    "make_optimizer",
    "make_plan",
    "measure_sensitivity",
    "plan_scheme",
    "profile_costs",
    "training_step",
]


def get_pock_model(model: nn.Module, config: PockConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a Pock adapter: freeze every parameter, replace each scheme module with a channel-sparse
    layer, and install the depth cut. Returns a `PeftModel` exposing `cut_layer` and `updated_modules`.

    Raises:
        ValueError: a scheme entry is not a linear module of `model`, its ratio is outside (0, 1], or the config's
            base-model fingerprint belongs to another model.
    """
    if config.task_type is None and hasattr(model, "generate"):
        config.task_type = "CAUSAL_LM"  # PeftModelForCausalLM: generate() and Trainer work as with LoRA
    with warnings.catch_warnings():
        # PEFT still reads transformers' deprecated `is_gradient_checkpointing`; nothing the user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config, adapter_name=adapter_name)
