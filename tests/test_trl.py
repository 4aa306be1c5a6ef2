"""TRL's SFTTrainer on Pock models (trl >= 1.16), end to end on a tiny random Llama.

A plain `SFTTrainer` computes the loss with its own fused LM head: Pock's depth cut and sparse layers train, the loss
equals the dense one, and Pock's label-only loss is never called. `PockSFTTrainer` makes the model's own loss (the
label-only loss) run instead and trains to the same parameters. Both: checkpointing above the cut only, an adapter
that reloads bit-exact, and a deepcopy reference model that training leaves alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

import pock_hf.tuner.loss as loss_module
from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.sft_trainer import PockSFTTrainer, has_pock_label_only_loss

from .conftest import byte_tokenizer
from .test_depth_cut import LayerProbe
from .tiny import tiny_llama

SCHEME = {"model.layers.2.mlp.up_proj": 0.5, "model.layers.3.self_attn.o_proj": 0.25}
STEPS = 2
BATCH = 4


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    """Conversational prompt/completion rows: SFTTrainer renders them with the chat template and labels only the
    completion."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Count to {i}."}],
            "completion": [{"role": "assistant", "content": " ".join(map(str, range(i + 3)))}],
        }
        for i in range(BATCH * STEPS)
    ]
    return Dataset.from_list(rows)


def pock_model(tokenizer, **config) -> PeftModel:
    base = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512)
    return get_pock_model(base, PockConfig(scheme=config.pop("scheme", SCHEME), **config))


def sft_args(tmp_path, **overrides) -> SFTConfig:
    """fp32 (SFTConfig's default is bf16), no checkpointing unless asked (SFTConfig's default is on), two steps."""
    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": BATCH,
        "max_steps": STEPS,
        "learning_rate": 1e-2,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    return SFTConfig(**{**settings, **overrides})


@pytest.fixture
def label_only_calls(monkeypatch) -> list[int]:
    """Counts calls of Pock's label-only loss (the installed forward looks it up at call time)."""
    calls: list[int] = []
    original = loss_module.label_only_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(loss_module, "label_only_loss", counting)
    return calls


def dense_loss(model, inputs: dict, num_items_in_batch) -> torch.Tensor:
    """The stock causal-LM loss from full logits (a call without labels runs the model's own forward)."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["labels"][:, 1:]
    count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
    return total / count


class DenseLossCheck:
    """Trainer mixin: records (the trainer's loss, the dense reference loss) for every training loss it computes."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.loss_pairs = getattr(self, "loss_pairs", [])
        self.loss_pairs.append((loss.detach().clone(), dense_loss(model, inputs, num_items_in_batch)))
        return loss


class CheckedSFTTrainer(DenseLossCheck, SFTTrainer):
    pass


class CheckedPockSFTTrainer(DenseLossCheck, PockSFTTrainer):
    pass


class ProbeCheckpoints(TrainerCallback):
    """Counts each decoder layer's checkpointed calls, from the moment Trainer has turned checkpointing on."""

    def __init__(self, probe: LayerProbe) -> None:
        self.probe = probe

    def on_train_begin(self, args, state, control, **kwargs):
        self.probe.count_checkpoints()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(trainer_class, tokenizer, dataset, tmp_path, model=None, callbacks=(), **overrides):
    """Train a Pock model (a fresh one unless given) for STEPS steps; returns (trainer, trained parameters). Fails
    unless every trainable tensor moved."""
    model = model if model is not None else pock_model(tokenizer)
    initial = trainable(model)
    trainer = trainer_class(
        model=model,
        args=sft_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.train()
    trained = trainable(model)
    assert set(trained) == set(initial) and all(not torch.equal(trained[n], initial[n]) for n in initial)
    return trainer, trained


def assert_dense_losses(trainer, micro_batches: int = STEPS) -> None:
    assert len(trainer.loss_pairs) == micro_batches
    for loss, reference in trainer.loss_pairs:
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_plain_sft_trainer_runs_trls_loss_with_the_cut_active(tokenizer, dataset, tmp_path, label_only_calls):
    model = pock_model(tokenizer)
    probe = LayerProbe(model.get_base_model().model.layers)
    trainer, _ = train(CheckedSFTTrainer, tokenizer, dataset, tmp_path, model=model)
    assert label_only_calls == []  # TRL's fused LM head computes the loss, not Pock's
    assert_dense_losses(trainer)
    assert probe.backwards[:2] == [0, 0] and probe.grad_outputs[:2] == [0, 0]  # nothing below the cut
    assert probe.backwards[2:] == [STEPS, STEPS]
    assert "mean_token_accuracy" in trainer.state.log_history[0]  # TRL's kernel's metrics are there


def test_pock_sft_trainer_runs_the_label_only_loss_and_trains_the_same(tokenizer, dataset, tmp_path, label_only_calls):
    # two micro-batches per step: the loss is a token sum over `num_items_in_batch`, as TRL's is
    accumulate = {"per_device_train_batch_size": BATCH // 2, "gradient_accumulation_steps": 2}
    _, trl_trained = train(SFTTrainer, tokenizer, dataset, tmp_path / "trl", **accumulate)
    assert label_only_calls == []
    model = pock_model(tokenizer)
    probe = LayerProbe(model.get_base_model().model.layers)
    trainer, pock_trained = train(
        CheckedPockSFTTrainer, tokenizer, dataset, tmp_path / "pock", model=model, **accumulate
    )
    # one call per micro-batch (the dense references run without labels, so they add none)
    assert len(label_only_calls) == 2 * STEPS
    assert_dense_losses(trainer, micro_batches=2 * STEPS)
    assert probe.backwards[:2] == [0, 0] and probe.grad_outputs[:2] == [0, 0]
    # AdamW's first steps move each weight by about lr = 1e-2 whatever the gradient's size: 1e-5 is a 0.1% step
    for name, value in trl_trained.items():
        torch.testing.assert_close(pock_trained[name], value, rtol=1e-4, atol=1e-5)


def test_peft_config_argument_wraps_the_base_model(tokenizer, dataset, tmp_path, label_only_calls):
    """TRL's own way to use a PEFT method: `SFTTrainer(model=base, peft_config=...)`."""
    base = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512)
    trainer = CheckedPockSFTTrainer(
        model=base,
        args=sft_args(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=PockConfig(scheme=SCHEME),
    )
    assert trainer.model.cut_layer == 2 and trainer.pock_label_only
    trainer.train()
    assert len(label_only_calls) == STEPS
    assert_dense_losses(trainer)


@pytest.mark.parametrize("trainer_class", [SFTTrainer, PockSFTTrainer])
def test_gradient_checkpointing_wraps_only_layers_above_the_cut(trainer_class, tokenizer, dataset, tmp_path):
    model = pock_model(tokenizer)
    probe = LayerProbe(model.get_base_model().model.layers)
    train(trainer_class, tokenizer, dataset, tmp_path, model, [ProbeCheckpoints(probe)], gradient_checkpointing=True)
    assert probe.checkpointed == [0, 0, STEPS, STEPS]  # non-reentrant (transformers 5): the cut layer too
    assert probe.backwards[:2] == [0, 0] and probe.grad_outputs[:2] == [0, 0]


@pytest.mark.parametrize("trainer_class", [SFTTrainer, PockSFTTrainer])
def test_saved_adapter_reloads_bit_exact(trainer_class, tokenizer, dataset, tmp_path):
    trainer, _ = train(trainer_class, tokenizer, dataset, tmp_path, save_strategy="steps", save_steps=STEPS)
    trainer.save_model(str(tmp_path / "adapter"))
    model = trainer.model.eval()
    batch = tokenizer(["Count to 3."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        for folder in (tmp_path / "adapter", tmp_path / "out" / f"checkpoint-{STEPS}"):
            base = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512)
            reloaded = PeftModel.from_pretrained(base, str(folder)).eval()
            assert torch.equal(reloaded(**batch).logits, expected), folder


def test_deepcopy_reference_model_is_left_alone_by_training(tokenizer, dataset, tmp_path):
    """TRL builds reference models by deepcopy: the copy must run its own modules, not the trained ones."""
    model = pock_model(tokenizer)
    reference = copy.deepcopy(model)
    batch = tokenizer(["Count to 3."], return_tensors="pt")
    with torch.no_grad():
        before = reference.eval()(**batch).logits
    train(PockSFTTrainer, tokenizer, dataset, tmp_path, model=model)
    with torch.no_grad():
        assert torch.equal(reference(**batch).logits, before)
        assert not torch.allclose(model.eval()(**batch).logits, before)
    # and the copy trains on its own, with the cut active
    probe = LayerProbe(reference.get_base_model().model.layers)
    train(PockSFTTrainer, tokenizer, dataset, tmp_path / "copy", model=reference)
    assert probe.backwards[:2] == [0, 0] and probe.backwards[2:] == [STEPS, STEPS]


def test_pock_sft_trainer_falls_back_to_trls_loss_where_it_needs_its_own(
    tokenizer, dataset, tmp_path, label_only_calls
):
    trainer, _ = train(PockSFTTrainer, tokenizer, dataset, tmp_path, loss_type="dft")
    assert label_only_calls == []  # DFT weighs each token by its probability: TRL's per-token log-probs
    assert has_pock_label_only_loss(trainer.model) and not trainer._model_loss_applies(return_outputs=False)
    stock_loss = pock_model(tokenizer, label_only_loss=False)
    assert not has_pock_label_only_loss(stock_loss) and not has_pock_label_only_loss(stock_loss.get_base_model())


def test_sft_trainer_refuses_a_scheme_that_updates_lm_head(tokenizer, dataset, tmp_path):
    model = pock_model(tokenizer, scheme={**SCHEME, "lm_head": 0.25})
    with pytest.raises(ValueError, match="lm_head"):
        PockSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)
