"""Save / load / merge round trips, and adapters that belong to another base model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from pock_hf import PockConfig, get_pock_model

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.1.self_attn.k_proj": 0.5, "model.layers.3.mlp.down_proj": 0.25}


@pytest.fixture(params=["out", "in"])
def trained(request, tmp_path):
    """A Pock model with non-zero deltas (random init plus one step), its logits, and its saved adapter folder."""
    config = PockConfig(scheme=SCHEME, channel_axis=request.param, init_weights=False, train_norms=True)
    model = get_pock_model(tiny_llama(), config)
    model.train()
    model(**tiny_batch()).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=tiny_batch()["input_ids"]).logits
    model.save_pretrained(tmp_path)
    return model, logits, tmp_path


def test_save_load_gives_identical_logits(trained):
    model, logits, path = trained
    loaded = PeftModel.from_pretrained(tiny_llama(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tiny_batch()["input_ids"]).logits, logits, rtol=0, atol=0)
    assert loaded.updated_modules == model.updated_modules


def test_merge_and_unload_gives_a_plain_model_with_identical_logits(trained):
    _, logits, path = trained
    merged = PeftModel.from_pretrained(tiny_llama(), path).merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("pock" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tiny_batch()["input_ids"]).logits, logits, rtol=1e-5, atol=1e-5)


def test_adapter_file_holds_only_selected_channels(trained):
    model, _, path = trained
    axis = model.peft_config["default"].channel_axis
    tensors = load_file(path / "adapter_model.safetensors")
    deltas = {k: v for k, v in tensors.items() if ".pock_delta" in k}
    indices = {k: v for k, v in tensors.items() if ".pock_indices" in k}
    norms = {k: v for k, v in tensors.items() if "layernorm" in k}
    assert len(deltas) == len(indices) == 2 and len(norms) == 4
    assert set(deltas) | set(indices) | set(norms) == set(tensors)
    k_proj = "base_model.model.model.layers.1.self_attn.k_proj"
    # k_proj is 16 x 32: half its rows (8 x 32) or half its columns (16 x 16)
    assert deltas[f"{k_proj}.pock_delta"].shape == ((8, 32) if axis == "out" else (16, 16))
    assert indices[f"{k_proj}.pock_indices"].tolist() == list(
        model.updated_modules["model.layers.1.self_attn.k_proj"].channels
    )
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    dense_size = (16 * 32 + 32 * 48) * 4  # what the two full weights would take
    size = (path / "adapter_model.safetensors").stat().st_size
    assert payload <= size < payload + 4096
    assert payload < dense_size / 2 + 4 * 32 * 4 + 2 * 8 * 16


def test_adapter_config_records_the_base_model_fingerprint(trained):
    _, _, path = trained
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "POCK"
    assert config["scheme"] == SCHEME
    assert config["base_model_fingerprint"]["shapes"]["model.layers.3.mlp.down_proj"] == [32, 48]


def test_loading_onto_a_base_with_other_shapes_names_the_module(trained):
    _, _, path = trained
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj"):
        PeftModel.from_pretrained(tiny_llama(intermediate_size=40), path)


def test_loading_onto_another_architecture_names_both_fingerprints(trained):
    _, _, path = trained
    expected = json.loads((path / "adapter_config.json").read_text())["base_model_fingerprint"]["digest"]
    with pytest.raises(ValueError, match=expected) as error:
        PeftModel.from_pretrained(tiny_llama(vocab_size=100), path)
    assert "vocab_size" in str(error.value)


def test_loaded_adapter_keeps_training(trained):
    _, _, path = trained
    model = PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True)
    model.train()
    assert model.cut_layer == 1
    model(**tiny_batch()).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
