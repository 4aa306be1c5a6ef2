"""The schema of a recipe config (`recipes/configs/*.yaml`): typed sections, `key=value` overrides, validation.

A config is YAML with the sections below; every key is optional and defaults to the value in its dataclass. Unknown
keys, values of the wrong type, missing input files, invalid combinations and output paths that would leave the
output folder are errors naming the key (with a did-you-mean for misspelt keys), raised by `load_recipe_config`
before any model is loaded. Relative input paths are read relative to the working directory, as a shell would.

    model:  {name, dtype, architecture}
    data:   {train, eval, split, eval_rows, max_rows, max_length, system_prompt, self_replay, packing}
    pock:   {scheme | layers + modules + ratio | table (+ costs) | measure, ...options}
    lora:   {r, alpha, dropout, target_modules}
    budget: {device, memory_mb, time_ratio}
    train:  {steps, batch_size, micro_batch_size, lr, schedule, ..., checkpoint_every, resume_from_checkpoint}
    eval:   {heldout_loss, personal, tasks, limit, data_dir}
    output: {dir, adapter, checkpoints, logs}
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import yaml

from .planning.calibration import parse_block

METHODS = ("pock", "lora", "full")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
MEASURE_METHODS = ("proxy", "measured")
PERSONAL_DATA = "personal"  # `data.train` value for the generated personalisation data (`personal:<profile>` too)
DATA_SUFFIXES = (".json", ".jsonl")
TASK_FILE_SUFFIXES = (*DATA_SUFFIXES, ".yaml", ".yml")  # pock-eval task specs and data files


class RecipeConfigError(ValueError):
    """A config that cannot run; the message names the key (and file) at fault."""


@dataclass
class ModelSection:
    """`name`: hub id, local checkpoint folder, or None for the embedded SmolLM2-135M-Instruct. `dtype`: dtype of the
    loaded (frozen) weights; `auto` takes the fastest one the device computes natively (bfloat16 on GPUs from compute
    capability 8.0 and on CPUs with AVX512-BF16/AMX, float16 on older GPUs, else float32; full fine-tuning keeps
    float32), see `pock_hf.engine.precision`. Trainable deltas and adapters stay float32. `architecture`: key of
    `recipes/architectures.yaml` used by `--dry-run` to build the model on the meta device without its weights
    (default: `name`)."""

    name: str | None = None
    dtype: str = "float32"
    architecture: str | None = None


@dataclass
class DataSection:
    """`train`: `personal` (the built-in profile's facts, see `pock_hf.data.personal`), `personal:<name>` (another
    built-in profile), a profile file (`.json` with `"format": "pock_hf personal profile"`: the user's own facts), a
    `.json`/`.jsonl` instruction file, or a hub data set id (read with `datasets.load_dataset`, split `split`).
    `eval`: held-out rows for the held-out loss; without it the last `eval_rows` rows of `train` are held out. `max_rows`: use only the first N training rows. `max_length`:
    tokens per row (longer answers are cut, rows whose prompt alone is that long are dropped and counted).
    `self_replay`: train also on the base model's own replies to everyday prompts (against forgetting). `packing`:
    train on padding-free batches (each micro-batch's rows end to end in one row, attention kept within each row;
    `InstructionCollator(packed=True)`): the same loss and gradients, no compute spent on padding."""

    train: str = PERSONAL_DATA
    eval: str | None = None
    split: str = "train"
    eval_rows: int = 0
    max_rows: int | None = None
    max_length: int = 256
    system_prompt: str | None = None
    self_replay: bool = False
    packing: bool = False


@dataclass
class PockSection:
    """Where the scheme comes from; exactly one of: `scheme` (a scheme or plan JSON file), `layers` (+ `modules`,
    `ratio`: those modules of those decoder layers, e.g. "24-31"), `table` (a sensitivity table JSON, planned under
    `budget` with the cost profile `costs`, profiled here when absent), or `measure` (`proxy` or `measured`: measure a
    table on the training data first, then plan). `measure_*` tune that measurement: `measure_micro_batch` rows per
    proxy backward (memory; same result), `measure_replay` the base model's replies to everyday probe prompts as
    replay data (each unit's damage, and each measured scheme's reply agreement with them), `measure_schemes` how many whole schemes to train for the gain model (0: plan on
    the additive score), each for `measure_scheme_steps` steps (default: `train.steps` up to 60: what the run will train),
    `proxy_optimizer` the optimizer the proxy estimates. `measure_depths` (fractions of the layers backward may reach,
    e.g. [0.2, 0.4, 0.6]) makes the measured schemes span depth instead: the table's best scheme under the ceiling at
    each depth for each of `measure_blocks` ("all", "mlp", "self_attn"; "mlp:0.25": its units at that ratio only),
    and the plan the cheapest of them within noise of the best measured, of those that keep the base model's replies
    as well as any of them (`measure_schemes` then does not count).
    `profile_depths` is how many cut depths the cost profile times (the rest interpolated). `spend` is `gain` (stop
    where predicted gain - `damage_weight` x damage stops growing) or `budget` (spend the ceiling). The rest are
    `PockConfig` options."""

    scheme: str | None = None
    layers: str | None = None
    modules: list[str] = field(
        default_factory=lambda: (
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
            + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        )
    )
    ratio: float = 0.25
    table: str | None = None
    costs: str | None = None
    measure: str | None = None
    measure_granularity: str = "module"
    measure_ratios: list[float] = field(default_factory=lambda: [0.25, 1.0])
    measure_steps: int = 8
    measure_eval_rows: int = 16
    measure_micro_batch: int | None = 1
    measure_replay: bool = True
    measure_schemes: int = 4
    measure_scheme_steps: int | None = None
    measure_depths: list[float] | None = None
    measure_blocks: list[str] = field(default_factory=lambda: ["all"])
    proxy_optimizer: str = "adamw"
    profile_depths: int = 8
    spend: str = "gain"
    damage_weight: float = 1.0
    channel_axis: str = "out"
    channel_selection: str = "magnitude"
    quantize_frozen: str | None = None
    gradient_checkpointing: bool = False
    train_norms: bool = False

    def source(self) -> str | None:
        """Which of the scheme sources is set (None when none is)."""
        chosen = [key for key in ("scheme", "layers", "table", "measure") if getattr(self, key) is not None]
        return chosen[0] if len(chosen) == 1 else None


@dataclass
class LoraSection:
    """PEFT LoRA options for `method: lora`."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class BudgetSection:
    """Training-memory budget: a device preset of `pock_hf.planning.costs.DEVICE_BUDGETS_MB` and/or `memory_mb` (MB; the
    smaller wins), and optionally a step-time budget `time_ratio` (fraction of a full fine-tuning step). The planner
    plans under it; any other scheme is checked against it before training."""

    device: str | None = None
    memory_mb: float | None = None
    time_ratio: float | None = None


@dataclass
class TrainSection:
    """`batch_size` rows per optimizer step, all processes together, in forwards of `micro_batch_size` rows per
    process (default: `batch_size` / processes, no accumulation). `lr` peaks after `warmup_steps` and then follows
    `schedule`. `checkpoint_every` steps (0: never) a checkpoint is written, the last `keep_checkpoints` kept;
    `resume_from_checkpoint` is `latest` (the newest complete one in the output folder, if any) or a checkpoint folder.
    `mixed_precision`: `auto` takes accelerate's setting (`accelerate launch --mixed_precision` / its config).
    `prefix_cache_mb` > 0 (Pock only): keep the hidden states at the depth cut of up to this many MB of training
    examples, so steps over examples seen before skip the frozen layers below the cut (exact; `PrefixCache`).
    `compile`: `torch.compile` the decoder layers (`pock_hf.engine.compile`; the first step compiles for tens of
    seconds; measured slower than eager for a Pock step on a 2-core AVX2 CPU, so off by default)."""

    steps: int = 60
    batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    optimizer_in_backward: bool = False
    prefix_cache_mb: float = 0.0
    compile: bool = False
    mixed_precision: str = "auto"
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume_from_checkpoint: str | None = None


@dataclass
class EvalSection:
    """`heldout_loss`: loss per labelled token on the held-out rows, before and after. `personal`: held-out fact recall
    and general-answer retention of the personalisation data (needs `data.train: personal`). `tasks`: pock-eval tasks
    run on the base and the tuned model (shipped task names, `.yaml` specs, or `.json`/`.jsonl` data files scored as
    their rows show, `:mc` / `:gen` / `:math` / `:text` to force a kind), their first `limit` rows each; shipped specs
    read their data from `data_dir` (default `$POCK_EVAL_DATA`, else `../shared/data`)."""

    heldout_loss: bool = True
    personal: bool = False
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    data_dir: str | None = None


@dataclass
class OutputSection:
    """`dir`: the run's folder. `adapter`, `checkpoints`, `logs`: sub-folders of it (relative, never leaving it)."""

    dir: str = "runs/recipe"
    adapter: str = "adapter"
    checkpoints: str = "checkpoints"
    logs: str = "logs"

    def path(self, key: str) -> Path:
        return Path(self.dir) / getattr(self, key)


@dataclass
class RecipeConfig:
    """A whole recipe config; `method` picks Pock or a baseline (PEFT LoRA, full fine-tuning) on the same pipeline."""

    method: str = "pock"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    pock: PockSection = field(default_factory=PockSection)
    lora: LoraSection = field(default_factory=LoraSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------------------------------------


def load_recipe_config(path: str | os.PathLike, overrides: list[str] = ()) -> RecipeConfig:
    """Read the YAML config at `path`, apply `key=value` overrides (dotted keys, YAML values), build and validate it.

    Raises:
        FileNotFoundError: `path` or an input file the config names does not exist (the key is named).
        RecipeConfigError: unknown key (with a did-you-mean), wrong type, invalid value or combination.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RecipeConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RecipeConfigError(f"{path}: expected a mapping of sections, got a {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    config = build(RecipeConfig, data, prefix="", source=str(path))
    validate(config, source=str(path))
    return config


def apply_override(data: dict, override: str) -> None:
    """Set `data[a][b] = value` for `override` = "a.b=value"; the value is parsed as YAML (`1e-3` as a number)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise RecipeConfigError(f"Override {override!r} is not key=value (e.g. train.lr=1e-4).")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeConfigError(f"Override {override!r}: {part!r} is not a section.")
    node[leaf] = yaml.safe_load(text) if text.strip() else None


def build(cls: type, data: dict, prefix: str, source: str):
    """An instance of dataclass `cls` from `data`, checking keys (did-you-mean) and types; sections recurse."""
    if not isinstance(data, dict):
        raise RecipeConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise RecipeConfigError(f"{source}: unknown key {prefix}{key!r}{hint}")
        if dataclasses.is_dataclass(hints[key]):
            values[key] = build(hints[key], value or {}, f"{prefix}{key}.", source)
        else:
            values[key] = _check_type(value, hints[key], f"{prefix}{key}", source)
    return cls(**values)


def _check_type(value, hint, key: str, source: str):
    """`value` if it matches `hint` (ints pass as floats, numeric strings such as "1e-3" become floats)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        origin = typing.get_origin(option)
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [_check_type(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        if option is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
        if (
            option in (int, str, bool)
            and isinstance(value, option)
            and not (option is int and isinstance(value, bool))
        ):
            return value
    expected = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise RecipeConfigError(f"{source}: {key} must be {expected}, got {value!r}")


# --- validation ------------------------------------------------------------------------------------------------------


def _choice(value, choices, key: str, source: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeConfigError(f"{source}: {key} is {value!r}; valid values: {', '.join(map(str, choices))}{hint}")


def _is_block_spec(spec, blocks: list[str], ratios: list[float]) -> bool:
    """`spec` names one of `blocks`, optionally with ":<ratio>" of `ratios` (see `calibration.parse_block`)."""
    try:
        name, ratio = parse_block(spec) if isinstance(spec, str) else (None, None)
    except ValueError:
        return False
    return name in blocks and (ratio is None or ratio in ratios)


def _positive(value, key: str, source: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise RecipeConfigError(f"{source}: {key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _input_file(path: str | None, key: str) -> None:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{key}: file not found: {path} (relative paths are read from {Path.cwd()})")


def is_builtin_personal(source: str) -> bool:
    """`personal` or `personal:<profile>`: the generated personalisation data of a built-in profile."""
    return source == PERSONAL_DATA or source.startswith(PERSONAL_DATA + ":")


def is_personal_data(source: str) -> bool:
    """A `data.train` value that gives personalisation data: a built-in profile or a profile file."""
    from .data.personal import is_profile_file

    return is_builtin_personal(source) or is_profile_file(source)


def is_local_data(source: str) -> bool:
    """A `data.train`/`data.eval` value that names a local file (by suffix) rather than a hub data set."""
    return source.endswith(DATA_SUFFIXES) or Path(source).is_file()


def check_output_subpath(value: str, key: str, source: str = "config") -> None:
    """Raise unless `value` is a relative path that stays inside the output folder."""
    parts = PurePath(value).parts
    if not value or PurePath(value).is_absolute() or ".." in parts:
        raise RecipeConfigError(
            f"{source}: {key} is {value!r}; it must be a relative path inside output.dir (no '..', not absolute), "
            "so that a run writes only into its own folder"
        )


def _check_eval_tasks(section: EvalSection, source: str) -> None:
    """Names and files of `eval.tasks`; their specs and rows are read by the recipe before the model loads."""
    for index, name in enumerate(section.tasks):
        if not name.strip():
            raise RecipeConfigError(f"{source}: eval.tasks[{index}] is empty; give a task name, spec or data file")
        forced = name.rpartition(":")[0]  # `rows.json:gen` forces how a data file is scored
        path = forced if forced.endswith(TASK_FILE_SUFFIXES) else name
        if path.endswith(TASK_FILE_SUFFIXES):
            _input_file(path, f"eval.tasks[{index}]")
    _positive(section.limit, "eval.limit", source)
    if section.data_dir is not None and not Path(section.data_dir).is_dir():
        raise FileNotFoundError(f"eval.data_dir: folder not found: {section.data_dir}")


def validate(config: RecipeConfig, source: str = "config") -> None:
    """Check values and combinations that need no model; see `load_recipe_config` for what is raised."""
    from .planning.costs import DEVICE_BUDGETS_MB  # lazy: costs imports torch-heavy modules

    _choice(config.method, METHODS, "method", source)
    _choice(config.model.dtype, DTYPES, "model.dtype", source)
    data, pock, train, budget = config.data, config.pock, config.train, config.budget
    for key in ("train", "eval"):
        value = getattr(data, key)
        if value is not None and not is_builtin_personal(value) and is_local_data(value):
            _input_file(value, f"data.{key}")
    if is_builtin_personal(data.train) and data.train != PERSONAL_DATA:
        from .data.personal import builtin_profiles

        _choice(data.train.partition(":")[2], builtin_profiles(), "data.train (personal:<profile>)", source)
    _positive(data.max_length, "data.max_length", source)
    _positive(data.eval_rows, "data.eval_rows", source, allow_zero=True)
    _positive(data.max_rows, "data.max_rows", source)
    personal = "personal, personal:<profile> or a profile file"
    if data.self_replay and not is_personal_data(data.train):
        raise RecipeConfigError(f"{source}: data.self_replay needs data.train: {personal}")
    if config.eval.personal and not is_personal_data(data.train):
        raise RecipeConfigError(f"{source}: eval.personal needs data.train: {personal}")
    _check_eval_tasks(config.eval, source)
    if config.method == "pock":
        if pock.source() is None:
            raise RecipeConfigError(
                f"{source}: set exactly one of pock.scheme, pock.layers, pock.table, pock.measure "
                f"(got {[k for k in ('scheme', 'layers', 'table', 'measure') if getattr(pock, k) is not None]})"
            )
        for key in ("scheme", "table", "costs"):
            _input_file(getattr(pock, key), f"pock.{key}")
        if pock.measure is not None:
            _choice(pock.measure, MEASURE_METHODS, "pock.measure", source)
        _choice(pock.measure_granularity, ("module", "layer"), "pock.measure_granularity", source)
        _choice(pock.proxy_optimizer, ("adamw", "sgd"), "pock.proxy_optimizer", source)
        _choice(pock.spend, ("gain", "budget"), "pock.spend", source)
        _positive(pock.measure_micro_batch, "pock.measure_micro_batch", source)
        _positive(pock.measure_scheme_steps, "pock.measure_scheme_steps", source)
        for depth in pock.measure_depths or []:
            if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 < depth <= 1:
                raise RecipeConfigError(
                    f"{source}: pock.measure_depths holds fractions of the layers backward may reach, in (0, 1]; "
                    f"got {depth!r}"
                )
        if pock.measure_depths is not None and not pock.measure_depths:
            raise RecipeConfigError(f"{source}: pock.measure_depths is empty; leave it unset or give depths")
        blocks = ["all", *sorted({module.split(".")[0] for module in pock.modules})]
        if not pock.measure_blocks or any(
            not _is_block_spec(block, blocks, pock.measure_ratios) for block in pock.measure_blocks
        ):
            raise RecipeConfigError(
                f"{source}: pock.measure_blocks must list blocks of pock.modules, from {blocks}, each optionally "
                f"':<ratio>' with a ratio of pock.measure_ratios {pock.measure_ratios}; got {pock.measure_blocks}"
            )
        _positive(pock.damage_weight, "pock.damage_weight", source, allow_zero=True)
        if pock.measure_schemes == 1 or pock.measure_schemes < 0:
            raise RecipeConfigError(
                f"{source}: pock.measure_schemes must be 0 (plan on the additive score) or >= 2 (a curve needs two "
                f"points), got {pock.measure_schemes}"
            )
        _choice(pock.channel_axis, ("out", "in"), "pock.channel_axis", source)
        _choice(pock.channel_selection, ("first", "magnitude"), "pock.channel_selection", source)
        _choice(pock.quantize_frozen, ("int8", "nf4", None), "pock.quantize_frozen", source)
        if not 0 < pock.ratio <= 1:
            raise RecipeConfigError(f"{source}: pock.ratio must be in (0, 1], got {pock.ratio}")
        unbudgeted = budget.device is None and budget.memory_mb is None and budget.time_ratio is None
        if pock.source() in ("table", "measure") and unbudgeted:
            raise RecipeConfigError(
                f"{source}: pock.{pock.source()} plans a scheme under a budget: set budget.device, "
                "budget.memory_mb or budget.time_ratio"
            )
    if budget.device is not None:
        _choice(budget.device, sorted(DEVICE_BUDGETS_MB), "budget.device", source)
    _positive(budget.memory_mb, "budget.memory_mb", source)
    _positive(budget.time_ratio, "budget.time_ratio", source)
    _positive(pock.profile_depths, "pock.profile_depths", source)
    for key in ("steps", "batch_size", "micro_batch_size", "lr", "log_every", "keep_checkpoints"):
        _positive(getattr(train, key), f"train.{key}", source)
    for key in ("warmup_steps", "weight_decay", "checkpoint_every", "max_grad_norm", "prefix_cache_mb"):
        _positive(getattr(train, key), f"train.{key}", source, allow_zero=True)
    _choice(train.schedule, SCHEDULES, "train.schedule", source)
    _choice(train.mixed_precision, MIXED_PRECISIONS, "train.mixed_precision", source)
    if train.optimizer_in_backward and train.max_grad_norm is not None:
        raise RecipeConfigError(
            f"{source}: train.optimizer_in_backward cannot clip (train.max_grad_norm): global clipping needs every "
            "gradient before any update. Drop one of the two."
        )
    if train.prefix_cache_mb and config.method != "pock":
        raise RecipeConfigError(
            f"{source}: train.prefix_cache_mb caches the frozen layers below a Pock model's depth cut; method "
            f"{config.method!r} has no such prefix. Set it to 0."
        )
    resume = train.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise FileNotFoundError(f"train.resume_from_checkpoint: checkpoint folder not found: {resume}")
    for key in ("adapter", "checkpoints", "logs"):
        check_output_subpath(getattr(config.output, key), f"output.{key}", source)
    for tracker in config.trackers:
        _choice(tracker, ("tensorboard",), "trackers[]", source)
