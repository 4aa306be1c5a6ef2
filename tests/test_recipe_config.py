"""Recipe configs: every shipped config validates and its memory plan fits (meta device); bad configs fail early."""

from __future__ import annotations

import json

import pytest
import yaml

from pock_hf.planning.memory_plan import meta_llama
from pock_hf.recipe_config import RecipeConfigError, load_recipe_config

from .test_recipe_helpers import CONFIGS, ROOT, load_recipe_module, write_config, write_rows

SHIPPED = sorted(CONFIGS.glob("*.yaml"))

# Published parameter counts (model cards), to check the architecture table behind --dry-run.
PARAMETERS = {
    "meta-llama/Llama-2-7b-hf": 6.74e9,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8.03e9,
    "meta-llama/Llama-3.2-1B-Instruct": 1.24e9,
    "meta-llama/Llama-3.2-3B-Instruct": 3.21e9,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1.10e9,
    "SmolLM2-135M-Instruct": 134.5e6,
}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe_module()


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name data relative to the project root, as the README runs them


def test_there_are_configs_for_every_target():
    names = {path.stem for path in SHIPPED}
    for fragment in ("demo_cpu", "smollm2_alpaca", "orin_agx_32gb", "orin_agx_64gb", "orin_nano_8gb", "gpu_24gb"):
        assert any(fragment in name for name in names), fragment
    assert any("nf4" in name and "gpu_12gb" in name for name in names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_validates_and_its_memory_plan_fits(path, recipe, in_root, capsys):
    config = load_recipe_config(path)
    result = recipe.dry_run(config)
    printed = capsys.readouterr().out
    assert "Predicted training memory" in printed and "Trainable parameters" in printed
    assert result["trainable_params"] > 0
    assert result["predicted_memory_mb"] <= recipe.budget_mb(config)
    assert (path.read_text().splitlines()[0]).startswith("#"), "each config starts with a comment"
    assert "recipes/finetune.py --config recipes/configs/" + path.name in path.read_text()


@pytest.mark.parametrize("name, count", PARAMETERS.items())
def test_architecture_table_gives_the_published_sizes(name, count):
    table = yaml.safe_load((ROOT / "recipes" / "architectures.yaml").read_text())
    model = meta_llama(table[name])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(count, rel=0.01)


def test_unknown_key_names_it_with_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(RecipeConfigError, match=r"unknown key train\.'lrr'.*did you mean train\.'lr'"):
        load_recipe_config(path)
    path.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(RecipeConfigError, match="did you mean 'train'"):
        load_recipe_config(path)


def test_overrides_apply_with_yaml_values_and_types_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pock:\n  layers: '1-2'\n")
    config = load_recipe_config(path, ["train.lr=1e-4", "train.steps=3", "method=lora"])
    assert (config.train.lr, config.train.steps, config.method) == (1e-4, 3, "lora")
    with pytest.raises(RecipeConfigError, match="train.steps must be int"):
        load_recipe_config(path, ["train.steps=many"])
    with pytest.raises(RecipeConfigError, match="not key=value"):
        load_recipe_config(path, ["train.steps"])
    with pytest.raises(RecipeConfigError, match="method is 'lorra'.*did you mean 'lora'"):
        load_recipe_config(path, ["method=lorra"])


def test_missing_data_file_names_the_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train: {tmp_path}/nowhere.json\npock:\n  layers: '1'\n")
    with pytest.raises(FileNotFoundError, match=r"data\.train: file not found: .*nowhere\.json"):
        load_recipe_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("output.adapter=../elsewhere", r"output\.adapter .*inside output\.dir"),
        ("output.checkpoints=/tmp/x", r"output\.checkpoints .*not absolute"),
        ("pock.table=t.json", "exactly one of pock.scheme, pock.layers, pock.table, pock.measure"),
        ("pock.ratio=1.5", r"pock\.ratio must be in \(0, 1\]"),
        ("budget.device=gpu-24g", "budget.device is 'gpu-24g'.*did you mean 'gpu-24gb'"),
        ("train.optimizer_in_backward=true", "cannot clip"),
        ("eval.personal=true", "eval.personal needs data.train: personal"),
        ("eval.tasks=[nowhere.jsonl:gen]", r"eval\.tasks\[0\]: file not found: nowhere\.jsonl"),
        ("eval.tasks=['']", r"eval\.tasks\[0\] is empty"),
        ("eval.limit=0", r"eval\.limit must be > 0"),
        ("pock.measure_depths=[0.5,1.2]", r"pock\.measure_depths holds fractions .* in \(0, 1\]; got 1\.2"),
        ("pock.measure_depths=[]", r"pock\.measure_depths is empty"),
        (
            "pock.measure_blocks=[attn]",
            r"pock\.measure_blocks must list blocks of pock\.modules, from \['all', 'mlp', 'self_attn'\]",
        ),
        ("pock.measure_blocks=[all,'mlp:0.3']", r"with a ratio of pock\.measure_ratios \[0\.25, 1\.0\]; got"),
        ("pock.measure_blocks=['mlp:x']", r"pock\.measure_blocks must list blocks"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, override, message):
    data = write_rows(tmp_path / "rows.json")
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train: {data}\npock:\n  layers: '1'\ntrain:\n  max_grad_norm: 1.0\n")
    with pytest.raises((RecipeConfigError, FileNotFoundError), match=message):
        load_recipe_config(path, [override])


def test_measure_without_budget_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pock:\n  measure: proxy\n")
    with pytest.raises(RecipeConfigError, match="set budget.device, budget.memory_mb or budget.time_ratio"):
        load_recipe_config(path)


def test_scheme_that_exceeds_the_budget_fails_before_training(tmp_path, recipe, in_root):
    config = load_recipe_config(CONFIGS / "llama3_8b_nf4_alpaca_gpu_12gb.yaml", ["pock.layers=0-31", "pock.ratio=1"])
    with pytest.raises(RecipeConfigError, match=r"exceeds the budget of 11,264 MB.*pock\.layers"):
        recipe.dry_run(config)


def test_scheme_planned_for_another_model_is_refused(tmp_path, recipe, in_root):
    plan = {
        "scheme": {"model.layers.3.mlp.up_proj": 0.25},
        "model_fingerprint": {"digest": "0123", "config": {"hidden_size": 4096, "num_hidden_layers": 32}},
    }
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps(plan))
    config = load_recipe_config(CONFIGS / "demo_cpu.yaml", ["pock.measure=null", f"pock.scheme={scheme}"])
    with pytest.raises(RecipeConfigError, match=r"pock\.scheme: .*scheme\.json was planned for another model"):
        recipe.dry_run(config)


def test_scheme_naming_modules_the_model_lacks_is_refused(tmp_path, recipe):
    data = write_rows(tmp_path / "rows.json")
    path = write_config(tmp_path / "c.yaml", tmp_path, data, tmp_path / "out", pock={"layers": "3-40"})
    config = load_recipe_config(path, ["model.architecture=SmolLM2-135M-Instruct"])
    with pytest.raises(RecipeConfigError, match=r"pock\.layers is '3-40'; this model has decoder layers 0\.\.29"):
        recipe.dry_run(config)


def test_sharded_launches_are_refused(recipe):
    from accelerate.utils import DistributedType

    recipe.check_distributed_type(DistributedType.MULTI_CPU)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(RecipeConfigError, match="does not support .*plain data parallelism") as error:
            recipe.check_distributed_type(sharded)
        # the launch it recommends is one that really starts N processes (`--cpu --num_processes N` starts one)
        assert "--multi_gpu --num_processes N" in str(error.value) and "starts one process only" in str(error.value)


def test_mixed_precision_falls_back_where_the_device_lacks_it(recipe, monkeypatch):
    import torch

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert recipe.resolve_mixed_precision("auto", torch.device("cpu")) == "bf16"
    assert recipe.resolve_mixed_precision("fp16", torch.device("cpu")) == "no"
    assert recipe.resolve_mixed_precision("bf16", torch.device("mps")) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert recipe.resolve_mixed_precision("bf16", torch.device("cuda")) == "fp16"


def test_batches_are_a_pure_function_of_step_and_seed(recipe):
    first = [recipe.batch_indices(10, 4, step, seed=3) for step in range(5)]
    assert first == [recipe.batch_indices(10, 4, step, seed=3) for step in range(5)]
    seen = [i for batch in first for i in batch]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs are permutations
    assert first != [recipe.batch_indices(10, 4, step, seed=4) for step in range(5)]


def test_a_cost_profile_measured_with_other_checkpointing_is_refused(recipe):
    from pock_hf.planning.costs import profile_costs

    from .tiny import tiny_llama

    costs = profile_costs(tiny_llama(), batch_size=1, seq_len=8, depths=[3], repeats=1, progress=False)
    recipe.check_costs_checkpointing(costs, False, "costs.json")
    with pytest.raises(recipe.RecipeConfigError, match=r"costs.json was measured without gradient checkpointing"):
        recipe.check_costs_checkpointing(costs, True, "costs.json")
    del costs.settings["gradient_checkpointing"]  # a profile from before the setting was recorded
    recipe.check_costs_checkpointing(costs, False, "costs.json")
