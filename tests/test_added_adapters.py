"""Adapters added after the first (`add_adapter`, `load_adapter`) get the same setup as the first one: the scheme is
checked, the base model fingerprinted, `train_norms` honoured, and the depth cut and forward hooks installed once."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from pock_hf import PockConfig, get_pock_model
from pock_hf.tuner import depth_cut

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.2.self_attn.v_proj": 0.5, "model.layers.3.mlp.gate_proj": 0.25}
OTHER = {"model.layers.1.mlp.up_proj": 0.5}


def logits(model) -> torch.Tensor:
    batch = tiny_batch()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def trainable_names(model) -> set[str]:
    """Names of the trainable parameters, as the transformers model names them."""
    return {name for name, parameter in model.get_base_model().named_parameters() if parameter.requires_grad}


def test_added_adapter_saves_and_loads_like_the_first(tmp_path):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    config = PockConfig(scheme=OTHER, init_weights=False)
    model.add_adapter("other", config)
    model.set_adapter("other")
    expected = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["other"])

    assert config.base_model_fingerprint is None  # the caller's config is left as it was, as get_pock_model leaves it
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "other")
    assert torch.equal(logits(reloaded), expected)
    model.load_adapter(tmp_path / "other", "again")
    model.set_adapter("again")
    assert torch.equal(logits(model), expected)


def test_load_adapter_refuses_an_adapter_for_another_base_as_from_pretrained_does(tmp_path):
    get_pock_model(tiny_llama(vocab_size=300), PockConfig(scheme=SCHEME)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another base model") as refused:
        PeftModel.from_pretrained(tiny_llama(), tmp_path)

    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    with pytest.raises(ValueError) as error:
        model.load_adapter(tmp_path, "foreign")
    assert str(error.value) == str(refused.value)
    assert "foreign" not in model.peft_config
    assert not any(".foreign" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("first_trains_norms", [False, True])
def test_train_norms_on_an_added_adapter_trains_its_layers_norms(first_trains_norms):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, train_norms=first_trains_norms))
    # layer 3 is also the first adapter's: with first_trains_norms its norms are already wrapped by PEFT
    scheme = {"model.layers.1.mlp.up_proj": 0.5, "model.layers.3.mlp.up_proj": 0.5}
    model.add_adapter("norms", PockConfig(scheme=scheme, train_norms=True))
    model.set_adapter("norms")

    norms = {
        f"model.layers.{layer}.{norm}.modules_to_save.norms.weight"
        for layer in (1, 3)
        for norm in ("input_layernorm", "post_attention_layernorm")
    }
    assert norms <= trainable_names(model)
    # another adapter's norm copies sit in the same PEFT wrapper, never in a wrapper nested inside it
    assert not any("original_module.modules_to_save" in name for name, _ in model.named_modules())
    assert model.cut_layer == 1


def test_added_adapter_with_a_wrong_channel_indices_count_is_refused():
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    bad = PockConfig(scheme=OTHER, channel_indices={"model.layers.1.mlp.up_proj": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"channel_indices\['model.layers.1.mlp.up_proj'\].*needs 24"):
        model.add_adapter("bad", bad)
    assert "bad" not in model.peft_config


def test_adding_adapters_installs_the_depth_cut_and_hooks_once(monkeypatch):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    model.add_adapter("other", PockConfig(scheme=OTHER))
    model.add_adapter("third", PockConfig(scheme=OTHER, train_norms=True))
    detached = []
    detach = depth_cut._detach_hidden_states
    monkeypatch.setattr(depth_cut, "_detach_hidden_states", lambda *a: detached.append(1) or detach(*a))

    model.train()
    model(**tiny_batch()).loss.backward()
    assert len(detached) == 1  # one cut wrapper per layer: a stacked second one would detach again
    transformer = model.get_base_model()
    assert len(transformer._forward_pre_hooks) == 1 and len(transformer._forward_hooks) == 1
