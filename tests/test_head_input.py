"""The output embeddings of a Pock model take contiguous inputs: transformers hands the head a strided view of the
last position when generating, and torch's CPU linear of a frozen bf16 weight on such a view copies the weight once
per batch row (pytorch/pytorch#151934)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.memory import current_memory_mb, peak_memory_mb, start_measured_phase

from .tiny import tiny_llama

SCHEME = {"model.layers.3.mlp.down_proj": 0.5}


def head_inputs(model, monkeypatch) -> list[bool]:
    """Whether each call of `F.linear` on the head's weight got a contiguous input (recorded while the test runs)."""
    weight = model.get_output_embeddings().weight
    seen, linear = [], F.linear

    def spy(x, w, *args, **kwargs):
        if w is weight:
            seen.append(x.is_contiguous())
        return linear(x, w, *args, **kwargs)

    monkeypatch.setattr(F, "linear", spy)
    return seen


def generate(model, batch: int = 3) -> torch.Tensor:
    prompt = torch.arange(1, 1 + 5 * batch).reshape(batch, 5) % 90 + 1
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)


def test_generation_hands_the_head_contiguous_inputs_and_the_same_tokens(monkeypatch):
    base = tiny_llama()
    expected = generate(base)
    stock = head_inputs(base, monkeypatch)
    generate(base)
    assert not all(stock)  # the view this guards against: transformers slices the last position
    model = get_pock_model(base, PockConfig(scheme=SCHEME))
    seen = head_inputs(model, monkeypatch)
    assert torch.equal(generate(model), expected)  # zero-initialised deltas: the base model's tokens
    assert seen and all(seen)
    clone = copy.deepcopy(model)  # the copy's patch wraps the copy's own head
    seen_by_clone = head_inputs(clone, monkeypatch)
    assert torch.equal(generate(clone), expected)
    assert seen_by_clone and all(seen_by_clone)


def test_unloading_gives_the_head_its_own_forward_back():
    base = tiny_llama()
    model = get_pock_model(base, PockConfig(scheme=SCHEME))
    assert "forward" in base.get_output_embeddings().__dict__
    restored = model.unload()
    assert "forward" not in restored.get_output_embeddings().__dict__


def test_batched_generation_from_a_frozen_bf16_head_holds_no_copy_per_row():
    # a SmolLM2-sized head (49,152 x 576, 54 MB in bf16) on a one-layer body; the copy per row would be 16 x 54 MB
    base = tiny_llama(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    ).to(torch.bfloat16)
    model = get_pock_model(base, PockConfig(scheme={"model.layers.0.mlp.down_proj": 0.25}))
    cpu = torch.device("cpu")
    generate(model, batch=16)  # warm-up: the weights' pages and oneDNN's buffers
    if not start_measured_phase(cpu):
        pytest.skip("a peak of this phase alone needs /proc/self/clear_refs (Linux), which this platform lacks")
    start = current_memory_mb(cpu)
    generate(model, batch=16)
    assert peak_memory_mb(cpu) - start < 8 * 54, peak_memory_mb(cpu) - start
