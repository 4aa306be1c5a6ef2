"""The PeftType shim and the registration with PEFT. If a PEFT release changes the mechanism, these fail loudly."""

from __future__ import annotations

import pytest
from peft import PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from pock_hf import PockConfig, PockModel, get_pock_model

from .tiny import tiny_llama


def test_pock_is_a_real_member_of_peft_type():
    member = PeftType.POCK
    assert member is PeftType("POCK") is PeftType["POCK"]
    assert member in list(PeftType)
    assert member == "POCK" and isinstance(member, str)


def test_pock_is_registered_with_peft():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["POCK"] is PockConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["POCK"] is PockModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["POCK"] == "pock_"


def test_peft_still_refuses_names_missing_from_the_enum():
    """The shim exists because PEFT refuses unknown names. If this starts passing registration, PEFT opened its
    registry: drop pock_hf/tuner/peft_type.py and register directly."""
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="not_a_method_xyz", config_cls=PockConfig, model_cls=PockModel)


def test_peft_config_loads_a_saved_pock_config(tmp_path):
    model = get_pock_model(tiny_llama(), PockConfig(scheme={"model.layers.0.mlp.up_proj": 0.5}))
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, PockConfig)
    assert config.peft_type is PeftType.POCK
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded.base_model, PockModel)


def test_one_config_wraps_two_base_models_and_stays_as_it_was():
    """get_pock_model records the base model's fingerprint in the wrapped model's copy of the config, not in the
    caller's: reusing the config on another base is not mistaken for loading a foreign adapter."""
    from pock_hf import PockConfig, get_pock_model

    from .tiny import tiny_llama

    config = PockConfig(scheme={"model.layers.3.mlp.up_proj": 0.5})
    first = get_pock_model(tiny_llama(), config)
    second = get_pock_model(tiny_llama(vocab_size=300), config)
    assert config.base_model_fingerprint is None and config.task_type is None
    digests = {m.peft_config["default"].base_model_fingerprint["digest"] for m in (first, second)}
    assert len(digests) == 2


def test_mixed_adapter_batches_are_refused_not_ignored():
    import pytest

    from pock_hf import PockConfig, get_pock_model

    from .tiny import tiny_batch, tiny_llama

    model = get_pock_model(tiny_llama(), PockConfig(scheme={"model.layers.3.mlp.up_proj": 0.5}))
    batch = tiny_batch()
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(**batch, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model.generate(input_ids=batch["input_ids"], adapter_names=["default", "default"], max_new_tokens=1)
    assert model(**batch).loss is not None  # without it nothing changes
