"""benchmarks/replay_damage.py on a tiny model: an adapter that changes nothing damages nothing and keeps every answer
word, one that moves the weights does damage and loses some, and scoring one adapter leaves the base model as it was
for the next."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from pock_hf import PockConfig, get_pock_model

from .tiny import load_benchmark, save_tiny_checkpoint


def save_adapter(base_folder, folder, scale: float):
    """A Pock adapter on every MLP up_proj of the tiny checkpoint, its deltas filled with `scale` x noise."""
    model = LlamaForCausalLM.from_pretrained(base_folder)
    names = [name for name, _ in model.named_modules() if name.endswith("mlp.up_proj")]
    wrapped = get_pock_model(model, PockConfig(scheme=dict.fromkeys(names, 1.0)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    wrapped.save_pretrained(folder)
    return folder


def test_replay_damage_is_zero_for_an_unchanged_model_and_leaves_the_base_untouched(tmp_path):
    bench = load_benchmark("replay_damage")
    base = save_tiny_checkpoint(tmp_path / "tiny")
    moved, unchanged = save_adapter(base, tmp_path / "moved", 0.5), save_adapter(base, tmp_path / "zero", 0.0)
    out = tmp_path / "damage.json"
    result = bench.main([str(moved), str(unchanged), "--model", str(base), "--dtype", "float32", "--output", str(out)])
    assert result["base"]["loss"] > 0
    assert abs(result[str(moved)]["damage"]) > 1e-3 and result[str(moved)]["agreement"] < 1.0
    # scored after `moved`: the base came back intact, so the unchanged adapter breaks nothing and keeps every answer
    assert result[str(unchanged)]["damage"] == pytest.approx(0.0, abs=1e-6)
    assert result[str(unchanged)]["agreement"] == 1.0
    assert 0.0 <= result[str(moved)]["retention"] <= 1.0
    assert json.loads(out.read_text()) == result
