"""An analytic estimate of training memory, for models this machine cannot load (built on the meta device).

The cost profiler (`pock_hf.planning.costs`) measures a model on the device that trains; a 7B model for a Jetson cannot be
profiled here. This estimate needs only the architecture and the scheme:

    weights      every parameter in its dtype; with `quantize_frozen`, decoder-layer linear weights at NF4
                 (4 bits + a fp32 absmax per 64 values, ~0.53 bytes) or int8 (1 byte + a fp32 scale per row)
    trainable    each trainable value: its gradient and AdamW's two moments, plus the value itself where it is not
                 a frozen weight (Pock deltas and LoRA matrices are separate tensors; full fine-tuning trains weights)
    activations  per token and per decoder layer that runs backward (all layers from the cut up):
                 (5 h + 2 kv + 3 i) values, h = hidden, kv = key/value width, i = MLP width, in the activation dtype;
                 with gradient checkpointing, h per layer plus one layer's worth
    logits       the loss: 1.5 x vocab x fp32 values per labelled position, at most one `loss_chunk_size` chunk
                 with the label-only loss, every token with the stock loss

The activation formula is calibrated on the profiler's exact count of the tensors autograd saves (SmolLM2-135M,
fp32, 8 x 128 tokens: 7,308 values per token and layer measured, 7,872 by the formula; the logits term: 308 MB
measured, 288 MB by the formula). It is an estimate for planning; the profiler on the device has the last word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

MB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0}  # per value, scales included (int8: per row, ~0 per value)
ADAMW_MOMENTS = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak training memory in MB, by part."""

    weights_mb: float
    trainable_mb: float
    activations_mb: float
    logits_mb: float

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.trainable_mb + self.activations_mb + self.logits_mb

    def describe(self) -> str:
        return (
            f"{self.total_mb:,.0f} MB = weights {self.weights_mb:,.0f} + trainable values with gradients and AdamW "
            f"state {self.trainable_mb:,.0f} + activations {self.activations_mb:,.0f} + logits {self.logits_mb:,.0f}"
        )


def meta_llama(architecture: dict, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with the given config fields on the meta device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**architecture)).to(dtype)


def frozen_weight_bytes(model: nn.Module, layers_name: str, dtype_bytes: int, quantize_frozen: str | None) -> float:
    """Bytes of every parameter of `model` except trainable ones that are not frozen weights (deltas, LoRA)."""
    total = 0.0
    for name, parameter in model.named_parameters():
        if "pock_delta" in name or "lora_" in name:
            continue
        in_layers = name.startswith(layers_name + ".") or f".{layers_name}." in name
        quantized = quantize_frozen and in_layers and parameter.dim() == 2
        total += parameter.numel() * (QUANTIZED_BYTES[quantize_frozen] if quantized else dtype_bytes)
    return total


def estimate_training_memory(
    model: nn.Module,
    *,
    layers_name: str,
    cut_layer: int,
    batch_size: int,
    seq_len: int,
    dtype: str,
    quantize_frozen: str | None = None,
    gradient_checkpointing: bool = False,
    label_only_loss: bool = True,
    loss_chunk_size: int = 1024,
) -> MemoryEstimate:
    """Estimate the peak memory of training `model` (already wrapped: its trainable parameters are what trains) on
    `batch_size` x `seq_len` tokens per forward, backward running from decoder layer `cut_layer` up. See the module
    docstring for the terms. Works on meta-device models."""
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    num_layers, hidden, mlp = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    dtype_bytes = DTYPE_BYTES[dtype]
    weights = frozen_weight_bytes(model, layers_name, dtype_bytes, quantize_frozen)
    trainable = 0.0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            separate = "pock_delta" in name or "lora_" in name
            value_bytes = 4 if separate else dtype_bytes  # deltas and LoRA matrices stay in fp32
            trainable += parameter.numel() * value_bytes * (1 + ADAMW_MOMENTS + separate)
    tokens = batch_size * seq_len
    layers_backward = max(0, num_layers - cut_layer)
    per_layer = (5 * hidden + 2 * kv + 3 * mlp) * dtype_bytes * tokens
    if gradient_checkpointing and layers_backward:
        activations = hidden * dtype_bytes * tokens * layers_backward + per_layer
    else:
        activations = per_layer * layers_backward
    positions = min(tokens, loss_chunk_size) if label_only_loss else tokens
    logits = 1.5 * positions * config.vocab_size * 4
    return MemoryEstimate(weights / MB, trainable / MB, activations / MB, logits / MB)


def loading_peak_mb(
    model: nn.Module, *, layers_name: str, dtype: str, quantize_frozen: str | None, quantized_at_load: bool
) -> float:
    """Predicted peak MB of the weights while the model loads (works on meta-device models).

    Quantized at load (`load_model_and_tokenizer(quantize=...)`), each tensor is quantized as it is read: the peak is
    the quantized model plus its largest tensor in `dtype`. Otherwise the whole model exists in `dtype` first, and
    quantizing after loading only lowers what training then holds."""
    dtype_bytes = DTYPE_BYTES[dtype]
    if not (quantize_frozen and quantized_at_load):
        return sum(p.numel() for p in model.parameters()) * dtype_bytes / MB
    largest = max(p.numel() for p in model.parameters()) * dtype_bytes
    return (frozen_weight_bytes(model, layers_name, dtype_bytes, quantize_frozen) + largest) / MB
