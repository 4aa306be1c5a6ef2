"""PockTrainer: the optimizer step inside backward and the prefix cache under transformers.Trainer give what the
plain Trainer gives."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from pock_hf import PockConfig, PrefixCache, get_pock_model
from pock_hf.data import InstructionCollator
from pock_hf.engine.trainer import PockTrainer

from .test_prefix_cache import examples
from .tiny import tiny_llama

SCHEME = {"model.layers.2.mlp.up_proj": 0.5, "model.layers.3.self_attn.o_proj": 0.25}


def run(
    tmp_path, trainer_class=Trainer, accumulation: int = 1, packed: bool = False, **trainer_kwargs
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, train_norms=True))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.0,
        lr_scheduler_type="linear",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=examples(5),  # 3 batches: with accumulation 2 the last window of each epoch is cut short
        data_collator=InstructionCollator(pad_token_id=0, packed=packed),
        **trainer_kwargs,
    )
    trainer.train()
    if isinstance(trainer, PockTrainer) and trainer.prefix_cache is not None:
        assert trainer.prefix_cache.stats.hit_batches > 0
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # two runs that trained nothing would compare equal: every trainable tensor must have moved
    assert set(trained) == set(initial) and all(not torch.equal(trained[n], initial[n]) for n in initial)
    return trained


def assert_same(got: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_optimizer_in_backward_matches_the_trainer(tmp_path, accumulation):
    expected = run(tmp_path / "plain", accumulation=accumulation)
    got = run(tmp_path / "pock", PockTrainer, accumulation=accumulation, optimizer_in_backward=True)
    assert_same(got, expected)


def test_prefix_cache_under_the_trainer(tmp_path):
    expected = run(tmp_path / "plain")
    got = run(tmp_path / "pock", PockTrainer, prefix_cache=PrefixCache())
    assert_same(got, expected)


def test_packed_batches_with_the_prefix_cache_match_the_padded_trainer(tmp_path):
    expected = run(tmp_path / "plain")
    got = run(tmp_path / "pock", PockTrainer, packed=True, prefix_cache=PrefixCache())
    # other shapes sum in another order: float rounding after 6 steps, nothing more
    assert_same(got, expected, rtol=1e-4, atol=1e-5)


def test_clipping_with_optimizer_in_backward_is_refused(tmp_path):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm=0.0"):
        PockTrainer(model=model, args=args, train_dataset=examples(2), optimizer_in_backward=True)
