"""The recipe end to end on a tiny model: every method, data edge cases, two CPU processes, SIGKILL and resume."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pock_hf.io.checkpoint import is_complete, latest_checkpoint, load_checkpoint

from .test_recipe_helpers import RECIPE, ROOT, load_recipe_module, write_config, write_rows
from .tiny import save_tiny_checkpoint

# One thread per process: the tiny model's ops are too small to share, and CI's two cores run two processes.
SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "ACCELERATE_USE_CPU": "true",
}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe_module()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def run(recipe):
    """Run the recipe in this process; accelerate's process-wide state is reset afterwards."""

    def run_recipe(config_path, *overrides) -> int:
        return recipe.main(["--config", str(config_path), *overrides])

    yield run_recipe
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def read_report(output) -> dict:
    return json.loads((output / "report.json").read_text())


def assert_loadable_and_trained(method: str, tiny_model, output) -> None:
    """The saved result loads (a whole model for full fine-tuning, else an adapter) and changes the base's logits."""
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_logits = base(**batch).logits
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(output / "adapter")
    else:
        tuned = PeftModel.from_pretrained(base, output / "adapter")
    assert not torch.allclose(tuned(**batch).logits, base_logits)


@pytest.mark.parametrize("method", ["pock", "lora", "full"])
def test_each_method_trains_and_writes_a_loadable_result(method, run, tiny_model, tmp_path):
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_model, write_rows(tmp_path / "rows.json"), output, method=method)
    assert run(config) == 0
    report = read_report(output)
    assert len(report["losses"]) == 4 and report["after"]["heldout_loss"] < report["before"]["heldout_loss"]
    assert (output / "loss.png").is_file() and list((output / "logs").rglob("events.out.tfevents*"))
    assert_loadable_and_trained(method, tiny_model, output)
    if method == "pock":
        assert report["summary"]["cut_layer"] == 2
        assert report["summary"]["trainable_params"] < report["summary"]["total_params"] / 4


@pytest.mark.parametrize(("method", "used"), [("pock", "bfloat16"), ("full", "float32")])
def test_dtype_auto_takes_bf16_frozen_weights_on_a_bf16_cpu(method, used, run, tiny_model, tmp_path, monkeypatch):
    """On a CPU with AVX512-BF16 (simulated), `auto` loads Pock's frozen weights in bf16 with float32 deltas; full
    fine-tuning keeps its trainable weights float32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_model, write_rows(tmp_path / "rows.json"), output, method=method)
    assert run(config, "model.dtype=auto") == 0
    report = read_report(output)
    assert report["model_dtype"]["requested"] == "auto" and report["model_dtype"]["used"] == used
    assert report["after"]["heldout_loss"] < report["before"]["heldout_loss"]
    if method == "pock":
        saved = load_file(output / "adapter" / "adapter_model.safetensors")
        assert saved and all(tensor.dtype == torch.float32 for tensor in saved.values() if tensor.is_floating_point())


def losses_off_and_on(run, tiny_model, tmp_path, option: str, *overrides: str) -> dict[str, list[float]]:
    """The training losses of the pock recipe with the boolean `option` "false" and "true"."""
    rows = write_rows(tmp_path / "rows.json")
    losses = {}
    for value in ("false", "true"):
        output = tmp_path / f"out-{value}"
        config = write_config(tmp_path / f"{value}.yaml", tiny_model, rows, output)
        assert run(config, f"{option}={value}", *overrides) == 0
        losses[value] = read_report(output)["losses"]
    return losses


def test_packed_batches_train_exactly_as_padded_ones(run, tiny_model, tmp_path):
    losses = losses_off_and_on(run, tiny_model, tmp_path, "data.packing")
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    assert losses["true"][-1] < losses["true"][0]


def test_quantize_frozen_with_a_fixed_scheme_loads_quantized(run, tmp_path):
    """The frozen weights never load in full precision: every decoder linear is NF4 from the start, and the saved
    adapter reloads onto a base loaded the same way to the trained model's outputs."""
    from pock_hf.data.default_model import load_model_and_tokenizer

    # shapes every bitsandbytes CPU path takes: on AVX512-BF16 CPUs it packs NF4 weights in blocks of 64 inputs x 32
    # outputs, and the default tiny model's 32-wide layers crash there inside bitsandbytes
    tiny_model = save_tiny_checkpoint(tmp_path / "tiny64", hidden_size=64, intermediate_size=128)
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_model, write_rows(tmp_path / "rows.json"), output)
    assert run(config, "pock.quantize_frozen=nf4") == 0
    report = read_report(output)
    assert report["quantized_at_load"] is True
    assert report["after"]["heldout_loss"] < report["before"]["heldout_loss"]
    base, _ = load_model_and_tokenizer(tiny_model, quantize="nf4")
    linears = [m for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m).__name__ == "Linear4bit" for m in linears)
    tuned = PeftModel.from_pretrained(base, output / "adapter").eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    plain, _ = load_model_and_tokenizer(tiny_model, quantize="nf4")
    with torch.no_grad():
        assert not torch.allclose(tuned(**batch).logits, plain(**batch).logits)


def test_train_compile_gives_the_eager_losses(run, tiny_model, tmp_path):
    losses = losses_off_and_on(run, tiny_model, tmp_path, "train.compile", "train.steps=2")
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_planned_from_a_measured_table_under_a_budget(run, tiny_model, tmp_path):
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "c.yaml",
        tiny_model,
        write_rows(tmp_path / "rows.json"),
        output,
        pock={"measure": "proxy", "measure_steps": 2, "measure_eval_rows": 4, "profile_depths": 2},
        budget={"memory_mb": 4000},  # process peak: this test process holds more than the tiny model
        train={"steps": 2},
    )
    assert run(config, "pock.layers=null") == 0
    report = read_report(output)
    assert report["plan"]["predicted_memory_mb"] <= 4000
    for name in ("scheme.json", "plan.md", "plan.png", "sensitivity.json", "sensitivity.png", "costs.json"):
        assert (output / name).is_file(), name
    # the saved table carries the measured schemes the gain model was fitted on, and every unit's damage
    table = json.loads((output / "sensitivity.json").read_text())
    assert len(table["schemes"]) >= 2 and all(row["damage"] is not None for row in table["rows"])
    plan = json.loads((output / "scheme.json").read_text())
    assert plan["gain_model"]["points"] == len(table["schemes"]) and plan["stop_reason"]
    assert report["plan"]["units"] == len(plan["units"])


def test_planned_among_measured_depths_with_checkpointing(run, tiny_model, tmp_path):
    output = tmp_path / "out"
    pock = {"measure": "proxy", "measure_steps": 2, "measure_eval_rows": 4, "profile_depths": 2}
    depths = {"measure_depths": [0.5, 1.0], "measure_blocks": ["all", "mlp"], "gradient_checkpointing": True}
    config = write_config(
        tmp_path / "c.yaml",
        tiny_model,
        write_rows(tmp_path / "rows.json"),
        output,
        pock={**pock, **depths},
        budget={"memory_mb": 4000},
        train={"steps": 2},
    )
    assert run(config, "pock.layers=null") == 0
    table = json.loads((output / "sensitivity.json").read_text())
    assert table["settings"]["scheme_candidates"] == "depths"
    labels = [scheme["label"] for scheme in table["schemes"]]
    assert labels and all(label.startswith(("all, layers ", "mlp, layers ")) for label in labels)
    for scheme in table["schemes"]:  # an MLP candidate trains MLPs only, and none reaches below its depth
        floor = int(scheme["label"].split("layers ")[1].split("-")[0])
        assert min(unit[0] for unit in scheme["units"]) >= floor
        if scheme["label"].startswith("mlp"):
            assert all(unit[1].startswith("mlp.") for unit in scheme["units"])
    plan = json.loads((output / "scheme.json").read_text())
    assert plan["selection"] == "measured"
    chosen = next(s for s in table["schemes"] if sorted(map(tuple, s["units"])) == sorted(map(tuple, plan["units"])))
    assert plan["predicted_gain"] == chosen["gain"]  # the plan's gain is what its scheme measured
    assert json.loads((output / "costs.json").read_text())["settings"]["gradient_checkpointing"] is True
    assert "Measured gain" in (output / "plan.md").read_text()
    assert all(scheme["peak_memory_mb"] > 0 for scheme in table["schemes"])  # each candidate's own measured peak
    # and what each kept of the base model's replies to the probe prompts, which the plan's report lists
    assert all(0.0 <= scheme["agreement"] <= 1.0 for scheme in table["schemes"])
    assert "| reply agreement |" in (output / "plan.md").read_text()


def test_cost_profile_measures_the_heaviest_micro_batch_of_the_run(recipe, tiny_model, tmp_path):
    """The profiled batch is one the run trains on and none of the run's is heavier in both positions and labelled
    tokens: the planned peak is this run's, not that of its longest rows put together (which may never meet)."""
    rows = [
        {"instruction": "Tell me " + "about it " * (i % 5 * 4), "output": "Sure, " + "and more " * (i * 7 % 9)}
        for i in range(30)
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    train = {"steps": 3, "batch_size": 4, "micro_batch_size": 2}
    config = recipe.load_recipe_config(
        write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "rows.json", tmp_path / "out", train=train), []
    )
    try:
        finetune = recipe.FinetuneRecipe(config)
        finetune.setup()
        heaviest = finetune.heaviest_micro_batch()
        batches = [
            finetune.train_collate([finetune.examples[i] for i in rows])
            for step in range(3)
            for rows in finetune.micro_batch_rows(step, 0)
        ]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert len(batches) == 6
    assert any(torch.equal(heaviest["input_ids"], batch["input_ids"]) for batch in batches)

    def size(batch):
        return batch["input_ids"].numel(), int((batch["labels"][:, 1:] != -100).sum())

    assert not any(all(a > b for a, b in zip(size(batch), size(heaviest))) for batch in batches)


def test_personalises_on_a_users_own_profile_file(run, tiny_model, tmp_path):
    profile = tmp_path / "me.json"
    facts = [
        {"key": f"pet{i}", "answer": f"Zorblat{i}", "statement": f"Pet {i} is Zorblat{i}.", "questions": qs}
        for i, qs in enumerate([["pet one?", "first pet?", "pet 1 name?"], ["pet two?", "second pet?", "pet 2?"]])
    ]
    profile.write_text(json.dumps({"format": "pock_hf personal profile", "version": 1, "name": "me", "facts": facts}))
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_model, profile, output, eval={"personal": True})
    assert run(config) == 0
    report = read_report(output)
    assert set(report["before"]) >= {"fact_recall", "general_retention"}
    heldout = json.loads((output / "data" / "heldout.json").read_text())
    assert {row["answer"] for row in heldout} == {"Zorblat0", "Zorblat1"}  # one held-out phrasing per fact


def test_eval_tasks_score_the_base_and_the_tuned_model(run, tiny_model, tmp_path, capsys):
    # a choice file in WinoGrande's inline layout and a maths file: the recipe runs pock-eval on both, before and after
    choice = tmp_path / "blanks.jsonl"
    rows = [
        {
            "instruction": f"Tom lent his bike {i} to Ben because _ needed it.\n\nOption1: Tom Option2: Ben "
            "Answer format: option1/option2",
            "answer": f"option{i % 2 + 1}",
        }
        for i in range(6)
    ]
    choice.write_text("".join(json.dumps(row) + "\n" for row in rows))
    maths = tmp_path / "sums.json"
    maths.write_text(json.dumps([{"instruction": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(6)]))
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "c.yaml",
        tiny_model,
        write_rows(tmp_path / "rows.json"),
        output,
        eval={"tasks": [str(choice), str(maths)], "limit": 4},
    )
    assert run(config) == 0
    report = read_report(output)
    for when in ("before", "after"):
        assert set(report[when]["eval"]) == {"blanks", "sums"} and report[when]["eval"]["blanks"]["n"] == 4
        assert set(report[when]["eval"]["blanks"]["metrics"]) == {"acc", "acc_norm"}
        assert "heldout_loss" in report[when]  # the recipe's own measures stay
    comparisons = {row["task"]: row for row in report["eval"]["comparisons"]}
    assert set(comparisons) == {"blanks", "sums"}
    for row in comparisons.values():
        assert row["ci_low"] <= row["difference"] <= row["ci_high"]
    assert report["eval"]["systems"][1]["adapter"] == str(output / "adapter")
    for name in ("summary.json", "summary.md", "comparison.png"):
        assert (output / "eval" / name).is_file(), name
    printed = capsys.readouterr().out
    assert "pock-eval, base model and + pock" in printed and "| blanks | 4 | acc |" in printed
    assert "system - baseline (points)" in printed


def test_a_bad_eval_task_stops_the_run_before_the_model_loads(run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "Pick.\n\nAnswer format: a/b", "answer": "c"}]))
    output = tmp_path / "out"
    # the model folder does not exist: an error about it would mean the model loaded before the tasks were read
    config = write_config(
        tmp_path / "c.yaml",
        tmp_path / "no-model",
        write_rows(tmp_path / "rows.json"),
        output,
        eval={"tasks": [str(bad)]},
    )
    assert run(config) == 2
    error = capsys.readouterr().err
    assert "eval.tasks: " in error and "bad.json, line 1: field 'answer': gold answer 'c'" in error


def test_optimizer_in_backward_gives_the_plain_loop_result(run, tiny_model, tmp_path):
    data = write_rows(tmp_path / "rows.json")
    adapters = []
    for in_backward in (False, True):
        output = tmp_path / f"out-{in_backward}"
        config = write_config(
            tmp_path / "c.yaml", tiny_model, data, output, train={"optimizer_in_backward": in_backward}
        )
        assert run(config) == 0
        adapters.append(load_file(output / "adapter" / "adapter_model.safetensors"))
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor)


def test_prefix_cache_gives_the_uncached_adapter(run, tiny_model, tmp_path):
    data = write_rows(tmp_path / "rows.json")
    adapters = []
    for cache_mb in (0, 64):
        output = tmp_path / f"out-{cache_mb}"
        # 8 steps x 4 rows go over the 20 training rows more than once
        train = {"prefix_cache_mb": cache_mb, "steps": 8}
        config = write_config(tmp_path / "c.yaml", tiny_model, data, output, train=train)
        assert run(config) == 0
        adapters.append(load_file(output / "adapter" / "adapter_model.safetensors"))
    cache = read_report(output)["prefix_cache"]
    assert cache["hit_batches"] > 0
    # the bound planning reserves for the cache (every training example's tokens at the cut) holds what it stored
    assert 0 < cache["size_mb"] <= cache["bound_mb"] < 64
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-5, atol=1e-6)


def test_the_planner_leaves_the_prefix_cache_its_memory(recipe, tiny_model, tmp_path):
    """A planned run with the prefix cache plans under the budget less the most the cache can hold: one hidden
    vector per token of every training example, capped at train.prefix_cache_mb."""
    rows = write_rows(tmp_path / "rows.json")
    ceilings = {}
    for cache_mb in (0, 0.01, 64):
        train = {"prefix_cache_mb": cache_mb}
        path = write_config(tmp_path / "c.yaml", tiny_model, rows, tmp_path / "out", train=train)
        config = recipe.load_recipe_config(path, ["budget.memory_mb=4000"])
        try:
            finetune = recipe.FinetuneRecipe(config)
            finetune.setup()
            ceilings[cache_mb] = finetune.planning_ceiling_mb()
            tokens = sum(len(example["input_ids"]) for example in finetune.examples)
            vector_mb = finetune.model.config.hidden_size * 4 / 2**20  # float32 hidden states
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    assert ceilings[0] == 4000
    assert ceilings[0.01] == pytest.approx(4000 - 0.01)  # the cap binds
    assert ceilings[64] == pytest.approx(4000 - tokens * vector_mb)  # every example fits under the cap
    assert tokens * vector_mb < 64


def test_data_edge_cases_are_counted_in_the_report(run, tiny_model, tmp_path):
    rows = json.loads(write_rows(tmp_path / "rows.json").read_text())
    rows.insert(0, {"instruction": "Tell me a long story.", "output": "Once upon a time " * 20})  # answer cut
    rows.insert(0, {"instruction": "Why? " * 40, "output": "Because."})  # the prompt alone fills max_length
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "rows.json", output, train={"steps": 1})
    assert run(config) == 0
    report = read_report(output)["training_data"]
    assert (report["dropped_too_long"], report["truncated"]) == (1, 1)
    assert report["kept"] == len(rows) - 4 - 1  # 4 held out, 1 dropped


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".json", r"rows\.json: the file is empty"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', ".jsonl", r"rows\.jsonl, line 2"),
        ('[{"instruction": "a"}]', ".json", r"row 0 \(0-based\): missing field 'output'"),
    ],
)
def test_bad_data_fails_before_training_naming_file_and_line(
    run, tiny_model, tmp_path, capsys, content, suffix, message
):
    data = tmp_path / f"rows{suffix}"
    data.write_text(content)
    config = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out")
    assert run(config) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "adapter").exists()


def test_no_row_left_after_tokenization_is_an_error(run, tiny_model, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model, write_rows(tmp_path / "rows.json"), tmp_path / "out")
    assert run(config, "data.max_length=8") == 2
    assert "No training row is left after tokenization with data.max_length=8" in capsys.readouterr().err


def launch(config, *args: str, processes: int = 1) -> subprocess.Popen:
    command = [sys.executable, str(RECIPE), "--config", str(config), *args]
    if processes > 1:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *command[1:],
        ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the recipe did not finish within {timeout} s:\n{output.decode()[-3000:]}")
    assert process.returncode == 0, output.decode()[-3000:]
    return output.decode()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pock", "lora", "full"])
def test_two_cpu_processes_under_accelerate_launch(method, tiny_model, tmp_path):
    output = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_model, write_rows(tmp_path / "rows.json"), output, method=method)
    finish(launch(config, processes=2))
    report = read_report(output)
    assert (report["num_processes"], report["distributed_type"]) == (2, "MULTI_CPU")
    assert len(report["losses"]) == 4 and not any(math.isnan(loss) for loss in report["losses"])
    # 4 small steps need not lower the held-out loss for LoRA: check the result loads and changed the model
    assert_loadable_and_trained(method, tiny_model, output)


@pytest.mark.slow
def test_a_cpu_launch_that_runs_fewer_processes_than_asked_says_so(tiny_model, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_model, write_rows(tmp_path / "rows.json"), tmp_path / "out")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE), "--config", str(config), "train.steps=1",
    ]  # fmt: skip
    output = finish(
        subprocess.Popen(command, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    )
    assert "asked for 2 processes but started 1" in output
    assert read_report(tmp_path / "out")["num_processes"] == 1


@pytest.mark.slow
def test_optimizer_in_backward_is_refused_on_several_processes(tiny_model, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_model, write_rows(tmp_path / "rows.json"), tmp_path / "out")
    process = launch(config, "train.optimizer_in_backward=true", processes=2)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and b"optimizer_in_backward cannot run on several processes" in output


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tiny_model, tmp_path, seed):
    data = write_rows(tmp_path / "rows.json")
    train = {"steps": 100, "checkpoint_every": 10, "keep_checkpoints": 2, "resume_from_checkpoint": "latest"}
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    # the same config for both runs except the output folder; the model is big enough that steps take a while
    finish(launch(write_config(tmp_path / "a.yaml", tiny_model, data, reference, train=train)))
    config = write_config(tmp_path / "b.yaml", tiny_model, data, interrupted, train=train)
    process = launch(config)
    checkpoints = interrupted / "checkpoints"
    # a random moment: once checkpoint 10, 20 or 30 exists (the run is then at a later step or writing a later
    # checkpoint), plus a random fraction of a step
    rng = random.Random(seed)
    target = checkpoints / f"checkpoint-{rng.choice([10, 20, 30])}"
    deadline = time.monotonic() + 300
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.02))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (interrupted / "adapter").exists(), "the run finished before it was killed: nothing was tested"
    # whatever the kill left: complete checkpoints load, anything else is never taken for one
    for folder in checkpoints.iterdir():
        if is_complete(folder):
            assert load_checkpoint(folder)[0]
        else:
            assert latest_checkpoint(checkpoints) != folder
    assert latest_checkpoint(checkpoints) is not None
    log = finish(launch(config))
    assert "Resumed at step" in log
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert read_report(interrupted)["losses"] == read_report(reference)["losses"]
