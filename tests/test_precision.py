"""`dtype: auto` (pock_hf.engine.precision) and Pock on a bf16 base: float32 deltas, gradients and optimizer state,
and save / load / merge keep the base's dtype."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.precision import resolve_dtype
from pock_hf.engine.training import make_optimizer, training_step

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.2.self_attn.v_proj": 0.5, "model.layers.3.mlp.down_proj": 0.25}


def fake_cpu(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_auto_on_cpu_takes_bf16_only_with_its_instructions(monkeypatch, avx512_bf16, amx, expected):
    fake_cpu(monkeypatch, avx512_bf16, amx)
    precision = resolve_dtype("auto", "cpu")
    assert precision.dtype == expected
    assert ("no AVX512-BF16" in precision.capability) != avx512_bf16
    assert ("no AMX" in precision.capability) != amx


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision = resolve_dtype("auto", "cuda")
    assert precision.dtype == expected and f"{capability[0]}.{capability[1]}" in precision.capability


def test_named_dtypes_are_kept_and_unknown_ones_refused():
    assert resolve_dtype("float16", "cpu").dtype == torch.float16
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def pock_on(dtype: torch.dtype, **options):
    model = get_pock_model(tiny_llama().to(dtype), PockConfig(scheme=SCHEME, **options))
    return model.train()


def test_bf16_base_trains_float32_deltas_whose_gradients_match_float32_compute():
    """Reference: the same bf16-rounded weights computed in float32. The bf16 model rounds activations to 8 bits of
    mantissa, so gradients agree to a stated tolerance: cosine >= 0.999 and relative norm error <= 2% per delta."""
    mixed = pock_on(torch.bfloat16, init_weights=False)
    reference = pock_on(torch.bfloat16, init_weights=False, channel_indices=_indices(mixed)).float()
    for name, parameter in mixed.named_parameters():
        reference.get_parameter(name).data.copy_(parameter.data.float())
    deltas = {n: p for n, p in mixed.named_parameters() if p.requires_grad}
    assert deltas and all(p.dtype == torch.float32 for p in deltas.values())
    assert all(p.dtype == torch.bfloat16 for n, p in mixed.named_parameters() if not p.requires_grad)
    batch = tiny_batch()
    mixed(**batch).loss.backward()
    reference(**batch).loss.backward()
    for name, parameter in deltas.items():
        grad, expected = parameter.grad, reference.get_parameter(name).grad
        assert grad.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), expected.flatten(), dim=0)
        assert cosine >= 0.999, name
        assert (grad - expected).norm() <= 0.02 * expected.norm(), name


def _indices(model) -> dict[str, list[int]]:
    return {name: list(updated.channels) for name, updated in model.updated_modules.items()}


def test_bf16_base_save_load_and_merge_keep_the_base_dtype(tmp_path):
    model = pock_on(torch.bfloat16)
    optimizer = make_optimizer(model, lr=3e-3)
    for _ in range(3):
        training_step(model, [tiny_batch()], optimizer)
    assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer.state.values())
    probe = tiny_batch(seed=7)["input_ids"]
    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=probe).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path).eval()
    assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if "pock_delta" in n)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, adapter_logits)
        merged = loaded.merge_and_unload()
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        # the merged weight is rounded to bf16 once, so it differs from base + float32 delta by that rounding only
        torch.testing.assert_close(merged(input_ids=probe).logits, adapter_logits, rtol=0.05, atol=0.05)
