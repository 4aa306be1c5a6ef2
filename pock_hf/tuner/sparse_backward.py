"""The channel-sparse update of a frozen linear layer, written so that autograd does only the sparse work.

For a frozen weight W (out x in) and selected channels R, the trainable delta D holds only |R| rows (axis "out",
D is |R| x in) or |R| columns (axis "in", D is out x |R|). The layer computes

    y = x W^T + b + scatter_R(x D^T)          (axis "out": D adds to the outputs R)
    y = x W^T + b + x[..., R] D^T             (axis "in":  D reads the inputs R)

which equals `F.linear(x, W_merged, b)` with W_merged = W + D placed at R. Because W and b are frozen, autograd
(checked in tests/test_sparse_layer.py with saved-tensor hooks):

- computes the weight gradient only for D: `dD = dy[..., R]^T x` or `dy^T x[..., R]`, cost proportional to |R|;
- computes the input gradient only when x requires grad (something below the layer trains); otherwise the graph
  holds no input-gradient work at all;
- for axis "in" saves only the selected slice x[..., R] for backward, never the whole input: an activation-memory
  saving, not only a compute one;
- never builds a gradient for W, so optimizer state exists only for D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_count(ratio: float, channels: int) -> int:
    """Number of channels a ratio in (0, 1] selects out of `channels`: round(ratio * channels), at least 1."""
    return max(1, min(channels, round(ratio * channels)))


def select_channels(weight: torch.Tensor, count: int, axis: str, rule: str) -> torch.Tensor:
    """Indices (sorted, int64) of `count` channels of `weight` (out x in) along `axis` chosen by `rule`.

    `"first"` takes channels 0..count-1; `"magnitude"` takes the channels whose weight slices have the largest L2
    norm (rows for axis "out", columns for axis "in"), ties broken by index.
    """
    if rule == "first":
        return torch.arange(count, dtype=torch.long)
    norms = weight.detach().float().norm(dim=1 if axis == "out" else 0).cpu()
    # a stable sort on the negated norms breaks ties by index, so the choice is deterministic
    return torch.sort(-norms, stable=True).indices[:count].sort().values


def add_sparse_delta(
    base_output: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, indices: torch.Tensor, axis: str
) -> torch.Tensor:
    """Add the contribution of a channel-sparse delta to the frozen layer's output `base_output`.

    Shapes: x (..., in), base_output (..., out); delta (k, in) for axis "out", (out, k) for axis "in";
    indices (k,) int64 on x's device.
    """
    delta = delta.to(x.dtype)
    if axis == "out":
        # (..., k) values land on the output channels R
        return base_output.index_add(-1, indices, F.linear(x, delta))
    # only x[..., R] (..., k) is kept for backward
    return base_output + F.linear(x.index_select(-1, indices), delta)


def delta_to_dense(delta: torch.Tensor, indices: torch.Tensor, axis: str, shape: torch.Size) -> torch.Tensor:
    """The dense (out x in) weight update that `delta` at `indices` represents."""
    dense = torch.zeros(shape, dtype=delta.dtype, device=delta.device)
    return dense.index_copy(0 if axis == "out" else 1, indices, delta)
