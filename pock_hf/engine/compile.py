"""Opt-in `torch.compile` of the decoder layers: the frozen forward, which bounds a Pock step, runs fused kernels.

Each decoder layer is compiled in place (`nn.Module.compile`), after `get_pock_model`, so the compiled code includes
the depth cut (layers below it still run without autograd) and the channel-sparse layers; training gives the eager
losses (tests/test_compile.py). Measured on the build machine (2-core AMD EPYC, AVX2 only, SmolLM2-135M, 8 Alpaca
rows padded to 256), a Pock step (layers 24-29 at 25%; `python benchmarks/speed.py --scheme
examples/schemes/layers_24-29_all_linears_quarter.json --setups pock_compiled,pock --warmup 2 --steps 4`) ran 0.79x as
fast (6.95 s against 5.50 s) at 0.84x the peak memory, after a first step that compiles for about 35 s. It does not
pay on this CPU, so it stays off by default (`train.compile` in the recipes); measure it where it might (GPUs).
"""

from __future__ import annotations

from torch import nn

from ..tuner.depth_cut import find_decoder_layers


def compile_decoder_layers(model: nn.Module, **compile_options) -> int:
    """Compile every decoder layer of `model` (a transformers or PEFT-wrapped causal LM) in place with
    `torch.compile` options `compile_options`; returns how many layers were compiled."""
    _, layers = find_decoder_layers(model)
    for layer in layers:
        layer.compile(**compile_options)
    return len(layers)
