"""Opt-in `torch.compile` of the decoder layers: the same training as eager, with the depth cut and the sparse
layers inside the compiled code."""

from __future__ import annotations

import torch

from pock_hf import PockConfig, get_pock_model
from pock_hf.engine.compile import compile_decoder_layers
from pock_hf.engine.training import make_optimizer, training_step

from .tiny import tiny_batch, tiny_llama

SCHEME = {"model.layers.2.mlp.up_proj": 0.5, "model.layers.3.self_attn.o_proj": 0.25}  # cut at layer 2


def train(compiled: bool) -> tuple[list[float], dict[str, torch.Tensor], int]:
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME)).train()
    count = compile_decoder_layers(model) if compiled else 0
    optimizer = make_optimizer(model, lr=1e-2)
    losses = [training_step(model, [tiny_batch(seed=seed)], optimizer).loss for seed in (1, 2, 1)]
    deltas = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert model.cut_layer == 2
    return losses, deltas, count


def test_compiled_layers_train_as_eager_ones():
    eager_losses, eager_deltas, _ = train(compiled=False)
    losses, deltas, count = train(compiled=True)
    assert count == 4
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert eager_losses[2] < eager_losses[0]  # training moved the model, so equal deltas say something
    # fused kernels round differently, and AdamW divides near-zero gradients by their own tiny magnitude: 1e-4 of
    # deltas that moved ~1e-2 per step
    for name, delta in eager_deltas.items():
        torch.testing.assert_close(deltas[name], delta, rtol=1e-3, atol=1e-4)
