"""Frozen weights in bitsandbytes int8 / NF4 with full-precision sparse deltas (`PockConfig(quantize_frozen=...)`)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.training import make_optimizer, training_step
from pock_hf.tuner.quantize import frozen_weight, is_quantized

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.2.self_attn.v_proj": 0.5, "model.layers.3.mlp.down_proj": 0.25}
KINDS = ["int8", "nf4"]


def quantized_model(kind: str, **options):
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME, quantize_frozen=kind, **options))
    model.train()
    return model


def dequantized_reference(model) -> nn.Module:
    """A plain fp32 Llama whose linear weights are the quantized model's dequantized values, with the same
    adapter: the dense computation the quantized one must reproduce."""
    reference = tiny_llama()
    for name, module in model.base_model.model.named_modules():
        if is_quantized(module):
            target = reference.get_submodule(name.replace(".base_layer", ""))
            target.weight.data = frozen_weight(module).clone()
    wrapped = get_pock_model(reference, PockConfig(scheme=SCHEME, channel_indices=channel_indices(model)))
    wrapped.train()
    return wrapped


def channel_indices(model) -> dict[str, list[int]]:
    return {name: list(updated.channels) for name, updated in model.updated_modules.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_linears_are_quantized_and_deltas_full_precision(kind):
    model = quantized_model(kind)
    inner = model.base_model.model
    decoder_linears = [m for n, m in inner.model.layers.named_modules() if isinstance(m, nn.Linear)]
    assert decoder_linears and all(is_quantized(m) for m in decoder_linears)
    assert not is_quantized(inner.lm_head)
    deltas = [p for n, p in model.named_parameters() if "pock_delta" in n]
    assert len(deltas) == len(SCHEME) and all(p.dtype == torch.float32 and p.requires_grad for p in deltas)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if "pock_delta" in n
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_delta_gradients_equal_the_dequantized_dense_model(kind):
    model = quantized_model(kind, init_weights=False)
    reference = dequantized_reference(model)
    for name, parameter in reference.named_parameters():
        if "pock_delta" in name:
            parameter.data = model.get_parameter(name).detach().clone()
    batch = tiny_batch()
    loss, reference_loss = model(**batch).loss, reference(**batch).loss
    torch.testing.assert_close(loss, reference_loss, rtol=1e-4, atol=1e-5)
    loss.backward()
    reference_loss.backward()
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(model.get_parameter(name).grad, parameter.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_only_the_deltas_and_merging_keeps_the_outputs(kind, tmp_path):
    model = quantized_model(kind)
    probe = tiny_batch(seed=7)["input_ids"]
    with torch.no_grad():
        # what quantizing costs: the zero-delta quantized model against the full-precision one
        quantization_error = (model.eval()(input_ids=probe).logits - tiny_llama()(input_ids=probe).logits).abs().max()
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = make_optimizer(model, lr=3e-3)
    losses = [training_step(model, [tiny_batch(seed=1)], optimizer).loss for _ in range(8)]
    assert losses[-1] < losses[0]
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, frozen_before[name]), f"{name} changed"

    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=probe).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        # the same base quantizes the same way, so the reloaded adapter model is the trained one exactly
        assert torch.equal(loaded(input_ids=probe).logits, adapter_logits)
        merged = model.merge_and_unload()
        assert all(is_quantized(m) for m in merged.model.layers[3].mlp.modules() if isinstance(m, nn.Linear))
        merged_logits = merged(input_ids=probe).logits
    # merging quantizes the updated weights again (NF4 blocks span rows, so neighbours of updated rows move too):
    # the stated tolerance is that merging costs at most 1.5x what quantizing the base did
    assert (merged_logits - adapter_logits).abs().max() <= 1.5 * quantization_error


def test_nf4_layers_stay_on_the_standard_layout_where_bitsandbytes_would_pack_them(monkeypatch):
    """On CPUs with AVX512-BF16, bitsandbytes repacks an NF4 weight in place on the first no-grad eval forward, and
    its packed layout cannot take this model's 32-wide inputs ("shape '[32, 0]' is invalid"). Simulate such a CPU
    here, whatever this one has: the layers must never be packed, and evaluation must equal training's forward."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)

    def refuse_packing(*args, **kwargs):
        raise AssertionError("an NF4 layer was repacked into the CPU inference layout")

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", refuse_packing)
    model = quantized_model("nf4")
    probe = tiny_batch(seed=7)["input_ids"]
    with torch.no_grad():
        training_logits = model.train()(input_ids=probe).logits
        evaluation_logits = model.eval()(input_ids=probe).logits
    torch.testing.assert_close(evaluation_logits, training_logits)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_an_nf4_layer_packed_by_an_earlier_inference_forward_is_restored_before_pock_reads_it():
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from pock_hf.tuner.quantize import keep_standard_layout, quantize_linear

    layer = quantize_linear(nn.Linear(128, 64, bias=False), "nf4")
    expected = frozen_weight(layer).clone()
    # what bitsandbytes does on the first inference forward on an AVX512-BF16 CPU
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    keep_standard_layout(layer)
    assert not layer.weight.quant_state.packing_format_for_cpu
    # the packed layout rounded the block scales to bfloat16; nothing else changed
    torch.testing.assert_close(frozen_weight(layer), expected, rtol=1e-2, atol=1e-3)
