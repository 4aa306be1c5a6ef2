"""Instruction fine-tuning with a Pock adapter (or the LoRA / full fine-tuning baselines), driven by a YAML config.

    accelerate launch recipes/finetune.py --config recipes/configs/smollm2_alpaca_cpu.yaml
    accelerate launch recipes/finetune.py --config recipes/configs/demo_cpu.yaml train.steps=20 output.dir=runs/x
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py --config ...   # two GPUs (DDP), or two CPU
                                    # processes (gloo) on a machine without GPU or with ACCELERATE_USE_CPU=true
    python recipes/finetune.py --config recipes/configs/llama3_8b_alpaca_gpu_24gb.yaml --dry-run

The sequence: setup (accelerator, model, data) -> plan (the Pock scheme, checked against the memory budget) ->
train (checkpoints every `train.checkpoint_every` steps; `train.resume_from_checkpoint=latest` continues exactly)
-> save (adapter, report, plots) -> evaluate (held-out loss; fact recall and retention for the personal data; the
pock-eval tasks of `eval.tasks`, base model against tuned model, with paired confidence intervals).
`--dry-run` stops after the plan and never loads weights: the model is built on the meta device from its
architecture (`recipes/architectures.yaml`), so configs for hardware this machine lacks can be checked here.
`method: lora | full` runs the baselines through the same data, loop and evaluation. Config keys: see
`pock_hf/recipe_config.py`. User errors print one message and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from peft import LoraConfig, PeftModel, get_peft_model
from pock_eval.models import System, make_systems
from pock_eval.report import markdown
from pock_eval.runner import Settings, evaluate_task, resolve_tasks, summarize_run, write_records, write_summary
from pock_eval.spec import Task
from tqdm.auto import tqdm

from pock_hf import PockConfig, PrefixCache, get_pock_model, make_plan, measure_sensitivity, profile_costs
from pock_hf.data import InstructionCollator, check_row, load_instruction_rows, tokenize_rows
from pock_hf.data.default_model import DEFAULT_MODEL, load_model_and_tokenizer
from pock_hf.data.personal import (
    PROBE_PROMPTS,
    REPLAY_PROMPTS,
    make_personal_dataset,
    replay_rows,
    write_personal_dataset,
)
from pock_hf.demo import evaluate_personal, plot_losses, summary_table
from pock_hf.engine.compile import compile_decoder_layers
from pock_hf.engine.generation import generate_replies
from pock_hf.engine.memory import peak_memory_mb, release_free_memory, reset_peak_memory
from pock_hf.engine.optim_in_backward import OptimizerInBackward
from pock_hf.engine.precision import AUTO, Precision, resolve_dtype
from pock_hf.engine.training import labelled_token_count, make_optimizer, set_learning_rate, training_step
from pock_hf.io.checkpoint import latest_checkpoint, load_checkpoint, restore_trainable, save_checkpoint, set_rng_state
from pock_hf.io.files import atomic_write_text, read_json_object
from pock_hf.planning.agreement import ReplyAgreement
from pock_hf.planning.calibration import measure_schemes
from pock_hf.planning.costs import DEVICE_BUDGETS_MB, CostProfile
from pock_hf.planning.memory_plan import MemoryEstimate, estimate_training_memory, loading_peak_mb, meta_llama
from pock_hf.planning.planner import Plan, plan_report, plot_gain_vs_budget
from pock_hf.planning.sensitivity import evaluate_loss, scheme_channel_indices
from pock_hf.planning.table import SensitivityTable
from pock_hf.recipe_config import (
    RecipeConfig,
    RecipeConfigError,
    is_builtin_personal,
    is_local_data,
    is_personal_data,
    load_recipe_config,
)
from pock_hf.tuner.depth_cut import find_decoder_layers
from pock_hf.tuner.fingerprint import model_fingerprint
from pock_hf.tuner.head_input import install_contiguous_head_input

ARCHITECTURES = Path(__file__).with_name("architectures.yaml")
# Sharded data parallelism would split the frozen weights too; Pock trains a small set of channels, so plain DDP
# (every process holds the whole model) is what it supports.
REFUSED_DISTRIBUTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
# the default training steps of a measured scheme: the run's own, up to this many
SCHEME_STEPS_CAP = 60


# --- setup: accelerator ----------------------------------------------------------------------------------------------


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Refuse sharded launches (FSDP, DeepSpeed, Megatron) with what to run instead."""
    if distributed_type in REFUSED_DISTRIBUTED:
        raise RecipeConfigError(
            f"This recipe does not support {distributed_type.value}: it shards the frozen weights, which Pock never "
            "updates, and its sharded optimizer would hold only a handful of channels. Launch with plain data "
            "parallelism instead: `accelerate launch --multi_gpu --num_processes N ...` (N GPUs; on a machine "
            "without a GPU, or with ACCELERATE_USE_CPU=true, N CPU processes on gloo; `--cpu --num_processes N` "
            "starts one process only), and shrink the frozen weights with pock.quantize_frozen=nf4 if they do not fit."
        )


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The mixed precision to use on `device`: `auto` takes accelerate's launch setting; bf16 falls back to fp16 on
    GPUs without bf16 and to fp32 ("no") on MPS; fp16 falls back to "no" on CPU (no fp16 autocast there)."""
    if requested == "auto":
        requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    if requested == "bf16" and device.type == "mps":
        return "no"
    if requested == "fp16" and device.type == "cpu":
        return "no"
    return requested


def use_cpu() -> bool:
    """Train on the CPU when asked (`ACCELERATE_USE_CPU`, `accelerate launch --cpu`) or when there is no GPU.

    accelerate sets up a gloo process group for several processes only when told it runs on the CPU; without this a
    `--multi_gpu` launch on a GPU-less machine would start independent single-process runs."""
    requested = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return requested or not (torch.cuda.is_available() or torch.backends.mps.is_available())


def launcher_processes() -> int | None:
    """The `--num_processes` of the `accelerate launch` that started this process (read from the parent's command
    line on Linux), or None when there is none to read."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as cmdline:
            words = cmdline.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in word for word in words[:3]):
        return None
    for index, word in enumerate(words):
        value = word.split("=", 1)[1] if word.startswith("--num_processes=") else None
        if word == "--num_processes" and index + 1 < len(words):
            value = words[index + 1]
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def warn_if_fewer_processes(started: int) -> None:
    """Say so when the launch asked for more processes than run: `accelerate launch --cpu --num_processes N` starts
    one process (its simple launcher), silently."""
    requested = launcher_processes()
    if requested is not None and requested > started:
        print(
            f"Warning: accelerate launch asked for {requested} processes but started {started}: a `--cpu` launch runs "
            f"one process. For {requested} CPU processes use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {requested} ...` (gloo).",
            file=sys.stderr,
            flush=True,
        )


def make_accelerator(config: RecipeConfig) -> Accelerator:
    cpu = use_cpu()
    state = PartialState(cpu=cpu)  # reads the process group that `accelerate launch` / torchrun set up
    check_distributed_type(state.distributed_type)
    mixed_precision = resolve_mixed_precision(config.train.mixed_precision, state.device)
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=list(config.trackers) or None,
        project_dir=str(config.output.path("logs")),
    )


def resolve_model_dtype(config: RecipeConfig, device: torch.device) -> Precision:
    """Settle `model.dtype` for `device`, writing the resolved name back into `config` and saying what `auto` chose.

    Full fine-tuning trains every weight, so there `auto` keeps them float32 (bf16 then comes from
    `train.mixed_precision`'s autocast, as with the Trainer); Pock and LoRA keep bf16/fp16 frozen weights with float32
    deltas."""
    requested = config.model.dtype
    if requested == AUTO and config.method == "full":
        precision = Precision(torch.float32, "full fine-tuning keeps its trainable weights float32")
    else:
        precision = resolve_dtype(requested, device)
    if requested == AUTO:
        print(f"model.dtype auto -> {precision.name} ({precision.capability})", flush=True)
    config.model.dtype = precision.name
    return precision


# --- setup: data -----------------------------------------------------------------------------------------------------


def load_rows(source: str, split: str) -> list[dict]:
    """Instruction rows from a local `.json`/`.jsonl` file (errors name the line or row and field) or a hub data set
    (`datasets.load_dataset(source, split=split)`, every row checked the same way)."""
    if is_local_data(source):
        return load_instruction_rows(source)
    from datasets import load_dataset

    rows = load_dataset(source, split=split).to_list()
    for index, row in enumerate(rows):
        check_row(row, f"{source} ({split}), row {index} (0-based)")
    return rows


@dataclasses.dataclass
class RecipeData:
    """Training and held-out rows, and the personal data set when the run uses it."""

    train: list[dict]
    heldout: list[dict]
    personal: object = None


def load_data(config: RecipeConfig, output: Path) -> RecipeData:
    data = config.data
    if is_personal_data(data.train):
        # `personal` is the default built-in profile, `personal:<name>` another built-in one, else the user's file
        profile = data.train
        if is_builtin_personal(data.train):
            profile = data.train.partition(":")[2] or None
        personal = make_personal_dataset(seed=config.train.seed, profile=profile)
        write_personal_dataset(output / "data", seed=config.train.seed, profile=profile)
        train, heldout = list(personal.train), list(personal.heldout)
    else:
        personal, train = None, load_rows(data.train, data.split)
        heldout = load_rows(data.eval, data.split) if data.eval else []
        if not data.eval and data.eval_rows:
            if len(train) <= data.eval_rows:
                raise RecipeConfigError(f"data.eval_rows={data.eval_rows} leaves no training row of {len(train)}")
            train, heldout = train[: -data.eval_rows], train[-data.eval_rows :]
    if data.max_rows:
        train = train[: data.max_rows]
    return RecipeData(train=train, heldout=heldout, personal=personal)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of global batch `step`: a stream of seeded per-epoch permutations, cut into batches.

    A pure function of (step, seed), so a resumed run sees exactly the batches the uninterrupted one would."""
    indices = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position + len(indices), num_examples)
        order = random.Random(f"{seed}-{epoch}").sample(range(num_examples), num_examples)
        indices += order[offset : offset + batch_size - len(indices)]
    return indices


def learning_rate(config: RecipeConfig, step: int) -> float:
    """The learning rate of step `step` (0-based): linear warm-up, then constant, linear or cosine decay to 0."""
    train = config.train
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    if train.schedule == "linear":
        return train.lr * (1 - progress)
    if train.schedule == "cosine":
        return train.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return train.lr


# --- plan: the scheme ------------------------------------------------------------------------------------------------


def parse_layers(text: str, num_layers: int) -> list[int]:
    """`"18-29"`, `"3,7,9"` or a mix, checked against the model's layer count."""
    layers: set[int] = set()
    try:
        for part in str(text).split(","):
            start, _, end = part.partition("-")
            layers.update(range(int(start), int(end or start) + 1))
    except ValueError:
        raise RecipeConfigError(f"pock.layers is {text!r}; expected layer indices like '20-29' or '3,7'") from None
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise RecipeConfigError(f"pock.layers is {text!r}; this model has decoder layers 0..{num_layers - 1}")
    return sorted(layers)


def budget_mb(config: RecipeConfig) -> float | None:
    """The memory budget (MB): the device preset's and `budget.memory_mb`, whichever is smaller; None if neither."""
    budgets = [DEVICE_BUDGETS_MB[config.budget.device]] if config.budget.device else []
    budgets += [config.budget.memory_mb] if config.budget.memory_mb else []
    return min(budgets) if budgets else None


def check_scheme_file(path: str, model, real_weights: bool) -> None:
    """A plan file records the model it was planned for: refuse it for another model before anything trains."""
    data = read_json_object(path, "Scheme file")
    recorded = data.get("model_fingerprint")
    if not recorded:
        return  # a bare {module: ratio} scheme: its module names are checked when the model is wrapped
    actual = model_fingerprint(model) if real_weights else None
    config = {key: getattr(model.config, key, None) for key in recorded.get("config", {})}
    if config != recorded.get("config") or (actual is not None and actual["digest"] != recorded.get("digest")):
        raise RecipeConfigError(
            f"pock.scheme: {path} was planned for another model (fingerprint {recorded.get('digest')}, "
            f"architecture {recorded.get('config')}); this model has {actual['digest'] if actual else config}. "
            "Measure and plan again on this model."
        )


def pock_options(config: RecipeConfig, **overrides) -> dict:
    pock = config.pock
    options = {
        "channel_axis": pock.channel_axis,
        "channel_selection": pock.channel_selection,
        "quantize_frozen": pock.quantize_frozen,
        "gradient_checkpointing": pock.gradient_checkpointing,
        "train_norms": pock.train_norms,
    }
    return {**options, **overrides}


def quantized_at_load(config: RecipeConfig) -> bool:
    """Whether the frozen weights load quantized (`pock.quantize_frozen` with a scheme that needs no measuring); a
    measurement takes weight gradients, so a measured or planned run loads in full precision and quantizes after
    choosing its scheme (measure the table on a bigger machine to plan on a small one)."""
    pock = config.pock
    return config.method == "pock" and pock.quantize_frozen is not None and pock.source() in ("scheme", "layers")


def static_scheme(config: RecipeConfig, model) -> dict[str, float] | str | None:
    """The scheme when the config states it (`pock.scheme` or `pock.layers`); None when it is planned."""
    pock = config.pock
    if pock.scheme is not None:
        return pock.scheme
    if pock.layers is not None:
        layers_name, stack = find_decoder_layers(model)
        layers = parse_layers(pock.layers, len(stack))
        return {f"{layers_name}.{layer}.{module}": pock.ratio for layer in layers for module in pock.modules}
    return None


def profile_device(config: RecipeConfig, model, batch: dict, ceiling_mb: float | None) -> CostProfile:
    """This device's cost profile on a training micro-batch (`pock.profile_depths` cut depths timed), its steps
    within `ceiling_mb` (MB of process peak; None: unbounded)."""
    num_layers = len(find_decoder_layers(model)[1])
    count = min(config.pock.profile_depths, num_layers)
    depths = sorted({round(i * (num_layers - 1) / max(1, count - 1)) for i in range(count)})
    return profile_costs(
        model,
        batch=batch,
        depths=depths,
        repeats=1,
        measure_full=config.budget.time_ratio is not None,
        budget_mb=ceiling_mb,
        gradient_checkpointing=config.pock.gradient_checkpointing,
    )


def check_costs_checkpointing(costs: CostProfile, checkpointing: bool, source: str | None) -> None:
    """Raise `RecipeConfigError` when a cost profile file was measured with checkpointing other than this run's: its
    activation memory would be the other setting's (profiles from before the setting count as without it)."""
    profiled = bool(costs.settings.get("gradient_checkpointing", False))
    if profiled != checkpointing:
        raise RecipeConfigError(
            f"The cost profile {source} was measured {'with' if profiled else 'without'} gradient checkpointing, but "
            f"pock.gradient_checkpointing is {str(checkpointing).lower()}: its memory figures do not hold for this "
            "run. Set pock.gradient_checkpointing to match, or profile again (leave pock.costs unset)."
        )


def scheme_steps(config: RecipeConfig) -> int:
    """Training steps of each measured scheme: `pock.measure_scheme_steps`, else the run's own up to
    `SCHEME_STEPS_CAP` (so measuring four schemes never costs much more than four short runs)."""
    return config.pock.measure_scheme_steps or min(config.train.steps, SCHEME_STEPS_CAP)


def plan_with(
    config: RecipeConfig, table: SensitivityTable, costs: CostProfile, ceiling_mb: float | None = None
) -> Plan:
    """The planner's plan for `table` and `costs` under `ceiling_mb` (MB; default: the config's budget) and the
    config's time ceiling, spend mode and damage weight."""
    return make_plan(
        table,
        costs,
        budget_mb=budget_mb(config) if ceiling_mb is None else ceiling_mb,
        budget_time_ratio=config.budget.time_ratio,
        axis=config.pock.channel_axis,
        spend=config.pock.spend,
        damage_weight=config.pock.damage_weight,
    )


def check_memory(config: RecipeConfig, estimate: MemoryEstimate) -> None:
    budget = budget_mb(config)
    if budget is not None and estimate.total_mb > budget:
        raise RecipeConfigError(
            f"The predicted training memory, {estimate.describe()}, exceeds the budget of {budget:,.0f} MB "
            f"(budget.device={config.budget.device}, budget.memory_mb={config.budget.memory_mb}). Update fewer or "
            "higher layers (pock.layers), a smaller pock.ratio, a smaller train.micro_batch_size or "
            "data.max_length, or quantize the frozen weights (pock.quantize_frozen=nf4)."
        )


def wrap(config: RecipeConfig, model, pock_config: PockConfig | None):
    """The model the method trains: a Pock or LoRA `PeftModel`, or the model itself with every weight trainable."""
    if config.method == "pock":
        return get_pock_model(model, pock_config)
    if config.method == "lora":
        lora = config.lora
        # a frozen head as Pock's, so the two generate (and compare peaks) alike
        install_contiguous_head_input(model)
        return get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model.requires_grad_(True)


def describe_model(model) -> dict:
    """What will train: method-independent counts, plus modules, ratios and cut for Pock."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the base model's size: Pock deltas and LoRA matrices sit beside its weights
    total = sum(p.numel() for name, p in model.named_parameters() if "pock_delta" not in name and "lora_" not in name)
    summary = {"trainable_params": trainable, "total_params": total}
    if hasattr(model, "cut_layer"):
        summary["cut_layer"] = model.cut_layer
        summary["modules"] = dict(model.peft_config[model.active_adapter].scheme)  # no indices: meta-safe
    return summary


def print_summary(summary: dict, estimate: MemoryEstimate, budget: float | None) -> None:
    print(f"Trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,}")
    if "cut_layer" in summary:
        print(f"Depth cut at decoder layer {summary['cut_layer']}: layers below it run no backward.")
        by_ratio: dict[float, list[str]] = {}
        for name, ratio in summary["modules"].items():
            by_ratio.setdefault(ratio, []).append(name)
        for ratio, names in sorted(by_ratio.items()):
            print(
                f"  ratio {ratio:g}: {len(names)} modules, e.g. {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            )
    limit = f" (budget {budget:,.0f} MB)" if budget is not None else ""
    print(f"Predicted training memory (analytic estimate): {estimate.describe()}{limit}")


def estimate_for(config: RecipeConfig, model, cut_layer: int, batch: int, seq_len: int) -> MemoryEstimate:
    layers_name, _ = find_decoder_layers(model)
    return estimate_training_memory(
        model,
        layers_name=layers_name,
        cut_layer=cut_layer,
        batch_size=batch,
        seq_len=seq_len,
        dtype=config.model.dtype,
        quantize_frozen=config.pock.quantize_frozen if config.method == "pock" else None,
        gradient_checkpointing=config.pock.gradient_checkpointing and config.method == "pock",
        label_only_loss=config.method == "pock",
    )


def eval_tasks(config: RecipeConfig) -> list[Task]:
    """The pock-eval tasks of `eval.tasks`, their specs and rows read and checked, so a bad one stops the run before
    any model loads.

    Raises:
        RecipeConfigError: a pairwise task (it needs a judge model).
        EvalDataError, FileNotFoundError: pock-eval's errors about the specs and data (file, line, field), prefixed
            with `eval.tasks`.
    """
    try:
        tasks = resolve_tasks(config.eval.tasks, config.eval.data_dir, limit=config.eval.limit)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"eval.tasks: {error}") from None
    judged = [task.name for task in tasks if task.spec.output_type == "pairwise"]
    if judged:
        raise RecipeConfigError(
            f"eval.tasks: {judged} are judged pairwise, which needs a judge model; after the run use "
            f"`pock-eval --adapter {config.output.path('adapter')} --tasks {','.join(judged)} --judge ...`"
        )
    return tasks


# --- dry run ---------------------------------------------------------------------------------------------------------


def architecture_of(config: RecipeConfig) -> dict:
    """Config fields of the model, from `recipes/architectures.yaml`, or the local checkpoint's config.json."""
    key = config.model.architecture or config.model.name or DEFAULT_MODEL
    table = yaml.safe_load(ARCHITECTURES.read_text(encoding="utf-8"))
    if key in table:
        return dict(table[key])
    local = Path(key) / "config.json"
    if local.is_file():
        return read_json_object(local, "Model config")
    raise RecipeConfigError(
        f"model.architecture: no architecture numbers for {key!r} in {ARCHITECTURES} (known: {', '.join(table)}); "
        "add its config.json fields there, or point model.name at a local checkpoint folder."
    )


def dry_run(config: RecipeConfig) -> dict:
    """Build the model on the meta device, apply the scheme, print what would train and the predicted memory.

    Raises:
        RecipeConfigError: the scheme does not fit the model or the predicted memory exceeds the budget.
    """
    architecture = {k: v for k, v in architecture_of(config).items() if k not in ("architectures", "torch_dtype")}
    # `auto` resolves for this machine; on the device that trains, the recipe resolves it again for that device
    local = "cpu" if use_cpu() else ("cuda" if torch.cuda.is_available() else "mps")
    resolve_model_dtype(config, torch.device(local))
    model = meta_llama(architecture, getattr(torch, config.model.dtype))
    batch, seq_len = micro_batch_size(config, 1), config.data.max_length
    print(f"Dry run of {config.method} on {config.model.name or DEFAULT_MODEL} (meta device: shapes, no weights)")
    plan_note = None
    if config.method == "pock":
        scheme = static_scheme(config, model)
        if config.pock.scheme is not None:
            check_scheme_file(config.pock.scheme, model, real_weights=False)
        if scheme is None and config.pock.table and config.pock.costs:
            table, costs = SensitivityTable.from_json(config.pock.table), CostProfile.from_json(config.pock.costs)
            scheme = plan_with(config, table, costs).scheme
        if scheme is None:
            plan_note = (
                f"the scheme is chosen at run time (pock.{config.pock.source()}) by the planner under the budget; "
                "shown: the deepest updated layer alone"
            )
            layers_name, stack = find_decoder_layers(model)
            scheme = {f"{layers_name}.{len(stack) - 1}.{m}": config.pock.ratio for m in config.pock.modules}
        # channel choice by magnitude needs weights; quantization needs real tensors: neither changes the shapes
        model = wrap(
            config,
            model,
            PockConfig(scheme=scheme, **pock_options(config, channel_selection="first", quantize_frozen=None)),
        )
    else:
        model = wrap(config, model, None)
    summary = describe_model(model)
    estimate = estimate_for(config, model, summary.get("cut_layer", 0), batch, seq_len)
    at_load = quantized_at_load(config)
    loading_mb = loading_peak_mb(
        model,
        layers_name=find_decoder_layers(model)[0],
        dtype=config.model.dtype,
        quantize_frozen=config.pock.quantize_frozen if config.method == "pock" else None,
        quantized_at_load=at_load,
    )
    if plan_note:
        print(f"Note: {plan_note}.")
    print_summary(summary, estimate, budget_mb(config))
    how = (
        "quantized as each tensor is read"
        if at_load
        else f"the whole model in {config.model.dtype}" + (", quantized after" if config.pock.quantize_frozen else "")
    )
    print(f"Predicted loading peak (weights): {loading_mb:,.0f} MB, {how}")
    check_memory(config, estimate)
    tasks = eval_tasks(config)
    if tasks:
        print(f"Evaluates base and tuned model on: {', '.join(f'{t.name} ({len(t.docs)} rows)' for t in tasks)}")
    return {
        **summary,
        "memory": dataclasses.asdict(estimate),
        "predicted_memory_mb": estimate.total_mb,
        "predicted_loading_mb": loading_mb,
    }


def micro_batch_size(config: RecipeConfig, num_processes: int) -> int:
    """Rows per forward per process; the global batch must split evenly into processes x micro-batches."""
    train = config.train
    micro = train.micro_batch_size or max(1, train.batch_size // num_processes)
    if train.batch_size % (micro * num_processes):
        raise RecipeConfigError(
            f"train.batch_size={train.batch_size} does not split into {num_processes} processes x "
            f"train.micro_batch_size={micro} rows"
        )
    return micro


# --- the recipe ------------------------------------------------------------------------------------------------------


class FinetuneRecipe:
    """setup -> plan -> train -> save -> evaluate, for one validated `RecipeConfig`.

    Raises:
        RecipeConfigError: optimizer_in_backward with several processes (its hooks would update each parameter
            before DDP averages the gradients), a scheme that does not fit the budget, data left empty.
    """

    def __init__(self, config: RecipeConfig):
        self.config = config
        self.output = Path(config.output.dir)
        self.accelerator = make_accelerator(config)
        self.is_main = self.accelerator.is_main_process
        if config.train.optimizer_in_backward and self.accelerator.num_processes > 1:
            raise RecipeConfigError(
                "train.optimizer_in_backward cannot run on several processes: its hooks update each parameter as "
                "soon as its local gradient is ready, before DDP averages gradients across processes. Set it false."
            )
        if self.is_main:
            warn_if_fewer_processes(self.accelerator.num_processes)
        self.micro_batch = micro_batch_size(config, self.accelerator.num_processes)
        requested_dtype = config.model.dtype
        precision = resolve_model_dtype(config, self.accelerator.device)
        self.report: dict = {
            "method": config.method,
            "config": config.to_dict(),
            "num_processes": self.accelerator.num_processes,
            "distributed_type": self.accelerator.distributed_type.value,
            "mixed_precision": self.accelerator.mixed_precision,
            "model_dtype": {"requested": requested_dtype, "used": precision.name, "why": precision.capability},
            "before": {},
            "after": {},
        }
        self.losses: list[float] = []
        # pock-eval: the tasks, and each one's per-example records and seconds on the base ("before") and tuned model
        self.eval_tasks: list[Task] = []
        self.eval_runs: dict[str, tuple[dict[str, list[dict]], dict[str, float]]] = {}
        self.eval_markdown = ""
        # (training, validation, replay) examples of the sensitivity measurement, for the measured schemes
        self.measurement_rows: tuple[list, list, list | None] | None = None
        # what a measured candidate keeps of the base model's replies to the probe prompts (with replay data only)
        self.agreement: ReplyAgreement | None = None

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # --- setup ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        started = time.perf_counter()
        self.output.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.find_checkpoint()
        self.eval_tasks = eval_tasks(config)
        at_load = quantized_at_load(config)
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model.name,
            dtype=getattr(torch, config.model.dtype),
            quantize=config.pock.quantize_frozen if at_load else None,
        )
        if not at_load:  # bitsandbytes placed the quantized weights on the device already
            self.model.to(self.accelerator.device)
        self.report["quantized_at_load"] = at_load
        self.data = load_data(config, self.output)
        self.task_examples = self.tokenize(self.data.train, "training")
        replay = []
        if config.data.self_replay:
            # the base model's own replies to everyday prompts, trained on beside the facts, keep its behaviour
            rows = replay_rows(generate_replies(self.model, self.tokenizer, list(REPLAY_PROMPTS)))
            self.data.train += rows
            replay = self.tokenize(rows, "self-replay")
        self.examples = self.task_examples + replay
        self.heldout = self.tokenize(self.data.heldout, "held-out") if self.data.heldout else []
        self.collate = InstructionCollator(pad_token_id=self.tokenizer.pad_token_id)
        # training batches (and the cost profile, which times a training batch) are packed when asked
        self.train_collate = InstructionCollator(self.tokenizer.pad_token_id, packed=self.config.data.packing)
        self.seq_len = max(len(example["input_ids"]) for example in self.examples)
        self.evaluate("before")
        self.report["setup_seconds"] = time.perf_counter() - started

    def find_checkpoint(self) -> Path | None:
        resume = self.config.train.resume_from_checkpoint
        if resume == "latest":
            return latest_checkpoint(self.config.output.path("checkpoints"))
        return Path(resume) if resume else None

    def tokenize(self, rows: list[dict], what: str) -> list[dict]:
        examples, report = tokenize_rows(
            rows, self.tokenizer, max_length=self.config.data.max_length, system_prompt=self.config.data.system_prompt
        )
        self.report[f"{what.replace('-', '')}_data"] = {**dataclasses.asdict(report), "summary": str(report)}
        self.log(f"{what.capitalize()} data: {report}")
        if not examples:
            raise RecipeConfigError(
                f"No {what} row is left after tokenization with data.max_length={self.config.data.max_length} "
                f"({report}); raise data.max_length or check the data."
            )
        return examples

    # --- plan ----------------------------------------------------------------------------------------------------

    def plan(self) -> None:
        """Choose the scheme (or resume the checkpoint's), wrap the model, check memory, build the optimizer."""
        config, model = self.config, self.model
        started = time.perf_counter()
        if self.checkpoint is not None and config.method != "full":
            self.log(f"Resuming from {self.checkpoint}: the adapter and its scheme come from the checkpoint.")
            model = PeftModel.from_pretrained(model, self.checkpoint / "adapter", is_trainable=True)
            planned = True
        elif config.method == "pock":
            pock_config, planned = self.pock_config()
            model = wrap(config, model, pock_config)
        else:
            model, planned = wrap(config, model, None), False
        summary = describe_model(model)
        estimate = estimate_for(config, model, summary.get("cut_layer", 0), self.micro_batch, self.seq_len)
        if self.is_main:
            print_summary(summary, estimate, budget_mb(config))
        if planned:  # the planner's schemes fit by construction, on costs measured on this device
            self.log("The budget is checked on the planner's prediction from costs measured here (see plan.md).")
        else:
            check_memory(config, estimate)
        self.report.update(summary=summary, memory_estimate=dataclasses.asdict(estimate))
        self.report["plan_seconds"] = time.perf_counter() - started
        release_free_memory(self.accelerator.device)  # what planning freed does not stand under training
        # attached before accelerate wraps the model, to the PeftModel whose depth cut it reads
        self.prefix_cache = (
            PrefixCache(config.train.prefix_cache_mb).attach(model) if config.train.prefix_cache_mb else None
        )
        if config.train.compile:  # after wrapping and the cache's patches, so the compiled code holds them
            self.log(f"Compiling {compile_decoder_layers(model)} decoder layers (the first step takes longer)")
        self.optimizer = make_optimizer(
            model,
            lr=config.train.lr,
            weight_decay=config.train.weight_decay,
            in_backward=config.train.optimizer_in_backward,
            accumulation_steps=config.train.batch_size // (self.micro_batch * self.accelerator.num_processes),
        )
        if isinstance(self.optimizer, OptimizerInBackward):
            self.model = self.accelerator.prepare(model)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)

    def pock_config(self) -> tuple[PockConfig, bool]:
        """The PockConfig from the config's scheme source, and whether the planner chose it."""
        config, pock = self.config, self.config.pock
        scheme = static_scheme(config, self.model)
        if pock.scheme is not None:
            check_scheme_file(pock.scheme, self.model, real_weights=True)
        if scheme is not None:
            return PockConfig(scheme=scheme, **pock_options(config)), False
        measured = pock.table is None
        table = SensitivityTable.from_json(pock.table) if not measured else self.measure()
        self.record_memory("sensitivity")
        table.check_model(self.model)
        costs = CostProfile.from_json(pock.costs) if pock.costs else None
        ceiling = self.planning_ceiling_mb()
        if ceiling is not None and ceiling < budget_mb(config):
            self.log(
                f"Planning under {ceiling:,.0f} MB: the budget less the {budget_mb(config) - ceiling:,.1f} MB "
                "the prefix cache may hold"
            )
        if costs is None:
            costs = profile_device(config, self.model, self.heaviest_micro_batch(), ceiling)
            self.record_memory("cost profile")
        costs.check_model(self.model)
        check_costs_checkpointing(costs, pock.gradient_checkpointing, pock.costs)
        if measured and (pock.measure_schemes or pock.measure_depths):
            steps = scheme_steps(config)
            self.log(
                f"Training schemes of growing depth ({steps} steps each) to plan on what they measure"
                if pock.measure_depths
                else f"Training {pock.measure_schemes} schemes of growing size ({steps} steps each) for the gain model"
            )
            table = measure_schemes(
                self.model,
                self.tokenizer,
                table,
                costs,
                *self.measurement_rows,
                budget_mb=ceiling,
                budget_time_ratio=config.budget.time_ratio,
                count=pock.measure_schemes,
                steps=steps,
                lr=config.train.lr,
                axis=pock.channel_axis,
                gradient_checkpointing=pock.gradient_checkpointing,
                depths=pock.measure_depths,
                blocks=pock.measure_blocks,
                agreement=self.agreement,
                progress=self.is_main,
            )
            self.record_memory("measured schemes")
        if self.is_main:  # kept before planning, so a plan that fails leaves the measurements to plan again
            costs.to_json(self.output / "costs.json")
            if measured:
                table.to_json(self.output / "sensitivity.json")
        plan = plan_with(config, table, costs, ceiling)
        report = plan_report(plan, costs)
        self.log(report)
        if self.is_main:
            plan.to_json(self.output / "scheme.json")
            atomic_write_text(self.output / "plan.md", report + "\n")
            plot_gain_vs_budget(plan, self.output / "plan.png", table=table)
        self.report["plan"] = {
            k: getattr(plan, k)
            for k in (
                "cut_layer",
                "predicted_gain",
                "predicted_gain_interval",
                "predicted_damage",
                "additive_gain",
                "predicted_memory_mb",
                "predicted_step_s",
                "stop_reason",
            )
        }
        self.report["plan"]["units"] = len(plan.units)
        indices = scheme_channel_indices(table, plan.scheme)  # proxy mode ranks channels by gradient too
        return PockConfig(scheme=plan.scheme, **pock_options(config, channel_indices=indices)), True

    def planning_ceiling_mb(self) -> float | None:
        """The memory ceiling (MB of process peak) the planner's schemes train under: the budget, less what the prefix
        cache may hold beside them, which no profiled step sees (None without a budget)."""
        budget = budget_mb(self.config)
        if budget is None:
            return None
        return budget - self.prefix_cache_bound_mb()

    def prefix_cache_bound_mb(self) -> float:
        """The most the prefix cache can hold in this run (MB): the hidden state at the cut of every training
        example's tokens (one vector each), up to `train.prefix_cache_mb`; 0 without the cache."""
        limit = self.config.train.prefix_cache_mb
        if not limit:
            return 0.0
        vector = self.model.config.hidden_size * self.model.get_input_embeddings().weight.element_size()
        tokens = sum(len(example["input_ids"]) for example in self.examples)
        return min(limit, tokens * vector / 2**20)

    def micro_batch_rows(self, step: int, rank: int) -> list[list[int]]:
        """The example indices of each micro-batch process `rank` trains on in step `step` (0-based)."""
        train, world = self.config.train, self.accelerator.num_processes
        mine = batch_indices(len(self.examples), train.batch_size, step, train.seed)[rank::world]
        return [mine[i : i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]

    def heaviest_micro_batch(self) -> dict:
        """The collated micro-batch of this run, on any process, whose step needs the most memory: the one that sets
        the training's peak, which is what the cost profile should measure. Its weight is what grows with the batch:
        a hidden state per position and a row of logits per labelled position (the label-only loss computes no
        others). The same on every process, so every process plans the same scheme."""
        model_config = self.model.config
        heaviest, heaviest_weight = None, -1
        for step in range(self.config.train.steps):
            for rank in range(self.accelerator.num_processes):
                for rows in self.micro_batch_rows(step, rank):
                    batch = self.train_collate([self.examples[i] for i in rows])
                    weight = (
                        batch["input_ids"].numel() * model_config.hidden_size
                        + labelled_token_count(batch) * model_config.vocab_size
                    )
                    if weight > heaviest_weight:
                        heaviest, heaviest_weight = batch, weight
        return heaviest

    def measure(self) -> SensitivityTable:
        """Measure a sensitivity table on the training data (its last task rows as the validation set; with
        `pock.measure_replay`, the base model's replies to everyday probe prompts as replay data) and save it."""
        pock = self.config.pock
        task = self.task_examples
        if len(task) <= pock.measure_eval_rows:
            raise RecipeConfigError(
                f"pock.measure_eval_rows={pock.measure_eval_rows} leaves no training row to measure on ({len(task)})"
            )
        replay = None
        if pock.measure_replay:
            self.log(f"Asking the base model {len(PROBE_PROMPTS)} everyday probe prompts (replay data for damage) ...")
            replies = generate_replies(self.model, self.tokenizer, list(PROBE_PROMPTS))
            replay = self.tokenize(replay_rows(replies, PROBE_PROMPTS), "replay")
            # the measured candidates' own replies are compared with these (what they keep of the base model)
            self.agreement = ReplyAgreement(self.tokenizer, PROBE_PROMPTS, tuple(replies))
        # validation: the last task rows (never the self-replay rows, whose loss tuning should not lower); training:
        # the rest, self-replay included, as the training itself sees them
        self.measurement_rows = (
            task[: -pock.measure_eval_rows] + self.examples[len(task) :],
            task[-pock.measure_eval_rows :],
            replay,
        )
        table = measure_sensitivity(
            self.model,
            self.tokenizer,
            *self.measurement_rows[:2],
            replay_data=replay,
            method=pock.measure,
            ratios=pock.measure_ratios,
            granularity=pock.measure_granularity,
            steps=pock.measure_steps,
            lr=self.config.train.lr,
            batch_size=self.config.train.batch_size,
            axis=pock.channel_axis,
            seed=self.config.train.seed,
            proxy_optimizer=pock.proxy_optimizer,
            micro_batch_size=pock.measure_micro_batch,
            budget_mb=budget_mb(self.config),
            progress=self.is_main,
        )
        if self.is_main:
            table.to_json(self.output / "sensitivity.json")
            table.plot_heatmap(self.output / "sensitivity.png", title=f"{pock.measure} sensitivity")
        return table

    # --- train ---------------------------------------------------------------------------------------------------

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def inner_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper around a torch optimizer

    def resume(self) -> int:
        """Restore parameters, optimizer state, loss history and RNG states; returns the step to continue from."""
        if self.checkpoint is None:
            return 0
        tensors, optimizer_state, state = load_checkpoint(self.checkpoint)
        restore_trainable(self.unwrapped(), tensors)
        self.inner_optimizer().load_state_dict(optimizer_state)
        self.losses = list(state["losses"])
        set_rng_state(state["rng"])
        self.log(f"Resumed at step {state['step']} of {self.config.train.steps}.")
        return state["step"]

    def save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            config = self.config
            save_adapter = self.unwrapped().save_pretrained if config.method != "full" else None
            position = divmod(step * config.train.batch_size, len(self.examples))
            save_checkpoint(
                config.output.path("checkpoints"),
                step,
                model=self.unwrapped(),
                optimizer_state=self.inner_optimizer().state_dict(),
                state={"losses": self.losses, "epoch": position[0], "position_in_epoch": position[1]},
                save_adapter=save_adapter,
                keep=config.train.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()

    def train(self) -> None:
        config, accelerator = self.config, self.accelerator
        train = config.train
        tracker_config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flat(config.to_dict())
        }
        accelerator.init_trackers("finetune", config=tracker_config)
        start = self.resume()
        rank = accelerator.process_index
        self.unwrapped().train()
        progress = tqdm(
            total=train.steps, initial=start, desc=f"training ({config.method})", unit="step", disable=not self.is_main
        )
        started = time.perf_counter()
        for step in range(start, train.steps):
            micro_batches = [
                {k: v.to(accelerator.device) for k, v in self.train_collate([self.examples[i] for i in rows]).items()}
                for rows in self.micro_batch_rows(step, rank)
            ]
            lr = learning_rate(config, step)
            set_learning_rate(self.optimizer, lr)
            step_started = time.perf_counter()
            stats = training_step(
                self.model,
                micro_batches,
                self.optimizer,
                max_grad_norm=train.max_grad_norm,
                backward=accelerator.backward,
                clip_grad_norm=accelerator.clip_grad_norm_,
            )
            seconds = time.perf_counter() - step_started
            # the mean of the processes' losses (each is the mean over its own labelled tokens), and all their tokens
            loss = accelerator.reduce(torch.tensor(stats.loss, device=accelerator.device), "mean").item()
            tokens = accelerator.reduce(torch.tensor(stats.tokens, device=accelerator.device), "sum").item()
            self.losses.append(loss)
            if (step + 1) % train.log_every == 0 or step + 1 == train.steps:
                metrics = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens / seconds}
                accelerator.log({**metrics, "train/memory_mb": peak_memory_mb(accelerator.device)}, step=step + 1)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}")
            if train.checkpoint_every and (step + 1) % train.checkpoint_every == 0 and step + 1 < train.steps:
                self.save_checkpoint(step + 1)
        progress.close()
        done = train.steps - start
        seconds = time.perf_counter() - started
        self.report.update(
            steps=train.steps,
            resumed_from_step=start,
            train_seconds=seconds,
            seconds_per_step=seconds / max(1, done),
            losses=self.losses,
        )
        if self.prefix_cache is not None:
            self.report["prefix_cache"] = {
                **dataclasses.asdict(self.prefix_cache.stats),
                "size_mb": self.prefix_cache.size_mb,
                "bound_mb": self.prefix_cache_bound_mb(),  # what planning left for it
            }

    # --- save and evaluate ---------------------------------------------------------------------------------------

    def save(self) -> None:
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return
        adapter = self.config.output.path("adapter")
        self.unwrapped().save_pretrained(adapter)
        if self.config.method == "full":
            self.tokenizer.save_pretrained(adapter)  # a full model is a checkpoint of its own: make it loadable
        title = f"{self.config.method} fine-tune of {self.config.model.name or DEFAULT_MODEL}"
        plot_losses(self.losses, self.output / "loss.png", title)

    def evaluate(self, when: str) -> None:
        """Held-out loss and, for the personal data, fact recall and retention; stored under report[when]."""
        config = self.config
        model = self.unwrapped()
        results = self.report[when]
        if config.eval.heldout_loss and self.heldout:
            batches = [
                {
                    k: v.to(self.accelerator.device)
                    for k, v in self.collate(self.heldout[i : i + self.micro_batch]).items()
                }
                for i in range(0, len(self.heldout), self.micro_batch)
            ]
            results["heldout_loss"] = evaluate_loss(model, batches)
        if config.eval.personal:
            self.log(f"Asking the {'base' if when == 'before' else 'tuned'} model the held-out questions ...")
            results.update(evaluate_personal(model, self.tokenizer, self.data.personal))
        if self.eval_tasks:
            # every process evaluates, as for the held-out loss (greedy, same numbers); the main one writes
            self.log(f"pock-eval on the {'base' if when == 'before' else 'tuned'} model ...")
            model.eval()  # dropout off; training turns it back on
            records, seconds, settings = {}, {}, self.eval_settings()
            for task in self.eval_tasks:
                started = time.perf_counter()
                records[task.name] = evaluate_task(model, self.tokenizer, task, settings)
                seconds[task.name] = time.perf_counter() - started
            self.eval_runs[when] = records, seconds
            if when == "after":
                self.compare_eval_tasks()

    def eval_settings(self) -> Settings:
        config = self.config
        return Settings(
            limit=config.eval.limit,
            seed=config.train.seed,
            device=str(self.accelerator.device),
            dtype=config.model.dtype,
            progress=self.is_main,
        )

    def compare_eval_tasks(self) -> None:
        """The pock-eval results of the base and the tuned model side by side, as `pock-eval --model M --adapter
        <output>/adapter` would give them: metrics with 95% CIs under report["before"]["eval"] and ["after"]["eval"],
        the paired differences under report["eval"], pock-eval's files in `<output>/eval/`."""
        config = self.config
        base = make_systems([config.model.name], [])[0]
        adapter = str(config.output.path("adapter"))
        label = f"{base.label}+{config.method}"
        # the full fine-tune is a whole model of its own; the others are adapters over the base
        tuned = System(label, adapter) if config.method == "full" else System(label, base.model, adapter)
        records = {base.label: self.eval_runs["before"][0], tuned.label: self.eval_runs["after"][0]}
        seconds = {base.label: self.eval_runs["before"][1], tuned.label: self.eval_runs["after"][1]}
        summary = summarize_run(
            [base, tuned], self.eval_tasks, records, seconds, self.eval_settings(), data_dir=config.eval.data_dir
        )
        self.report["before"]["eval"] = summary["results"][base.label]
        self.report["after"]["eval"] = summary["results"][tuned.label]
        self.report["eval"] = {key: summary[key] for key in ("tasks", "comparisons", "settings", "systems")}
        self.eval_markdown = markdown(summary)
        if self.is_main:
            folder = self.output / "eval"
            for system in (base, tuned):
                for name, task_records in records[system.label].items():
                    write_records(folder, system.label, name, task_records)
            write_summary(summary, folder)

    def finish(self, started: float) -> None:
        self.report["total_seconds"] = time.perf_counter() - started
        # the run's peak (MB): the largest of its phases' (setup, plan, train; evaluation after training last)
        self.record_memory("evaluate")
        self.report["peak_memory_mb"] = max(self.report["phase_peak_memory_mb"].values())
        self.accelerator.end_training()
        if not self.is_main:
            return
        atomic_write_text(self.output / "report.json", json.dumps(self.report, indent=1) + "\n")
        print(summary_table(self.report["before"], self.report["after"], self.config.method))
        if self.eval_markdown:
            print(f"\npock-eval, base model and + {self.config.method} (files in {self.output / 'eval'}/):\n")
            print(self.eval_markdown)
        losses = self.losses
        print(
            f"Trained {self.report['summary']['trainable_params']:,} parameters for {self.config.train.steps} steps "
            f"in {self.report['train_seconds']:.0f} s ({self.report['seconds_per_step']:.2f} s/step); loss "
            f"{losses[0]:.2f} -> {losses[-1]:.2f}. Total {self.report['total_seconds']:.0f} s. "
            f"Adapter, report and plots in {self.output}/"
        )

    def record_memory(self, phase: str) -> None:
        """This process's peak memory (MB) during `phase` (since the previous record) into the report, then start
        the next phase's peak."""
        device = self.accelerator.device
        self.report.setdefault("phase_peak_memory_mb", {})[phase] = peak_memory_mb(device)
        reset_peak_memory(device)

    def run(self) -> dict:
        started = time.perf_counter()
        self.setup()
        self.record_memory("setup")
        self.plan()
        self.record_memory("plan")
        self.train()
        self.record_memory("train")
        self.save()
        self.evaluate("after")
        self.finish(started)
        return self.report


def _flat(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="a YAML config, e.g. recipes/configs/demo_cpu.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print what would train and its memory, then exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 output.dir=runs/x")
    args = parser.parse_args(argv)
    try:
        config = load_recipe_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(config)
        else:
            FinetuneRecipe(config).run()
    except (ValueError, FileNotFoundError, ImportError) as error:
        if args.debug:
            raise
        print(f"finetune: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
