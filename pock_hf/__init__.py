"""pock_hf: PockEngine-style sparse fine-tuning for Hugging Face Llama-family models.

Measure which layers and channels matter, update only those, and run no backward below the deepest updated layer.
"""

from .log_filters import silence_bitsandbytes_kernel_notice

silence_bitsandbytes_kernel_notice()  # before the imports below pull in peft, and with it bitsandbytes

from .engine.memory import bound_kernel_caches

bound_kernel_caches()  # before any matmul: a run's memory then stays where its profiled step predicts

from .engine.optim_in_backward import OptimizerInBackward
from .engine.prefix_cache import PrefixCache
from .engine.trainer import PockTrainer
from .engine.training import StepStats, make_optimizer, training_step
from .planning.costs import CostProfile, profile_costs
from .planning.planner import Plan, make_plan, plan_scheme
from .planning.sensitivity import gradient_channel_indices, measure_sensitivity
from .planning.table import SensitivityRow, SensitivityTable
from .tuner import PockConfig, PockModel, UpdatedModule, get_pock_model, load_pock_adapter

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
