"""Quantized loading (`load_model_and_tokenizer(quantize=...)`, what the recipe uses for `pock.quantize_frozen` with
a fixed scheme): the layers are quantized as they load, and the process never holds the float model meanwhile."""

from __future__ import annotations

import pytest
import torch

from pock_hf.data.default_model import load_model_and_tokenizer

from .tiny import load_benchmark, save_tiny_checkpoint

# ~30M parameters: 122 MB in float32, so what loading holds stands well above the process's own noise
MIDSIZE = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_every_decoder_linear_loads_quantized_and_the_head_does_not(tmp_path, kind):
    model, _ = load_model_and_tokenizer(save_tiny_checkpoint(tmp_path / "tiny"), quantize=kind)
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    expected = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[kind]
    assert linears and all(type(m).__name__ == expected for m in linears)
    assert type(model.lm_head) is torch.nn.Linear


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown quantization 'fp4'"):
        load_model_and_tokenizer(save_tiny_checkpoint(tmp_path / "tiny"), quantize="fp4")


@pytest.mark.slow
def test_nf4_loading_never_holds_the_float_model(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "midsize", **MIDSIZE)
    float_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    loading = load_benchmark("loading_memory").measure(folder, "nf4")
    # NF4 holds ~0.53 bytes per weight against float32's 4; half the float model leaves room for loading's own
    # buffers while any moment holding the float weights (one copy of them) would exceed it
    assert loading["anon_peak_mb"] < 0.5 * float_mb, loading


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_layers_load_on_the_standard_layout_and_run_inference_on_any_shape(tmp_path, dtype):
    # 32-wide layers: bitsandbytes' packed AVX512-BF16 CPU layout, which it would switch to on the first no-grad
    # forward in eval mode, takes in_features in multiples of 64 only and crashes on these
    model, _ = load_model_and_tokenizer(save_tiny_checkpoint(tmp_path / "tiny"), dtype=dtype, quantize="nf4")
    nf4 = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert nf4 and not any(m.support_avx512bf16_for_cpu for m in nf4)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in nf4)
