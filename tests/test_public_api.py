"""The names design.md's public contract promises are importable from `pock_hf` itself."""

import pock_hf

CONTRACT = ("PockConfig", "get_pock_model", "SensitivityTable", "measure_sensitivity", "plan_scheme", "profile_costs")


def test_contract_names_are_exported():
    missing = [name for name in CONTRACT if not hasattr(pock_hf, name)]
    assert not missing, missing
    assert set(CONTRACT) <= set(pock_hf.__all__)
    assert issubclass(pock_hf.PockConfig, __import__("peft").PeftConfig)
