"""The Pock tuner layer: a frozen linear plus a trainable delta over a subset of its channels."""

from __future__ import annotations

import warnings

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .quantize import frozen_weight, keep_standard_layout, set_frozen_weight
from .sparse_backward import add_sparse_delta, delta_to_dense


class PockLayer(BaseTunerLayer):
    """Adapter state kept per adapter name: the delta (trainable), its channel indices, ratio and axis.

    The indices live in a persistent `BufferDict`, so PEFT saves them in `adapter_model.safetensors` beside the delta
    and restores them on load (the default `persistent=False` would silently drop them).
    """

    adapter_layer_names = ("pock_delta",)
    other_param_names = ("pock_indices", "pock_ratio", "pock_axis")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.pock_delta = nn.ParameterDict({})
        self.pock_indices = BufferDict({}, persistent=True)
        self.pock_ratio: dict[str, float] = {}
        self.pock_axis: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"Pock updates nn.Linear layers only, got {type(base).__name__}.")
        keep_standard_layout(base)  # an NF4 base computes the same in training and evaluation on every CPU
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(
        self, adapter_name: str, ratio: float, axis: str, indices: torch.Tensor, init_weights: bool = True
    ) -> None:
        """Create the delta for `adapter_name` over the channels `indices` (int64, sorted) along `axis`."""
        channels = self.out_features if axis == "out" else self.in_features
        if indices.ndim != 1 or indices.numel() == 0 or int(indices.min()) < 0 or int(indices.max()) >= channels:
            raise ValueError(f"Channel indices must be a non-empty 1-D set within [0, {channels}), got {indices}.")
        if indices.unique().numel() != indices.numel():
            raise ValueError("Channel indices must not repeat.")
        weight = self.get_base_layer().weight
        shape = (indices.numel(), self.in_features) if axis == "out" else (self.out_features, indices.numel())
        # a quantized base weight (int8 / packed NF4) gets a full-precision delta, as QLoRA's adapters are
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        delta = torch.zeros(shape, dtype=dtype, device=weight.device)
        if not init_weights:
            nn.init.normal_(delta, std=0.02)
        self.pock_delta[adapter_name] = nn.Parameter(delta)
        self.pock_indices[adapter_name] = indices.to(device=weight.device, dtype=torch.long)
        self.pock_ratio[adapter_name] = ratio
        self.pock_axis[adapter_name] = axis
        self.set_adapter(self.active_adapters)


class Linear(nn.Module, PockLayer):
    """Pock update of an `nn.Linear`; the forward equals the merged weight's forward."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        ratio: float,
        axis: str,
        indices: torch.Tensor,
        init_weights: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        PockLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, ratio, axis, indices, init_weights=init_weights)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense (out x in) update of `adapter`; zero outside its channels."""
        return delta_to_dense(
            self.pock_delta[adapter],
            self.pock_indices[adapter],
            self.pock_axis[adapter],
            # the logical shape: a quantized weight is stored packed
            torch.Size((self.out_features, self.in_features)),
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' deltas into the base weight (a quantized one is dequantized, updated
        in float32 and quantized again)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.pock_delta:
                continue
            merged = self._base_weight_plus(self.get_delta_weight(adapter))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            set_frozen_weight(self.get_base_layer(), merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.pock_delta:
                set_frozen_weight(self.get_base_layer(), self._base_weight_plus(-self.get_delta_weight(adapter)))

    def _base_weight_plus(self, update: torch.Tensor) -> torch.Tensor:
        weight = frozen_weight(self.get_base_layer())  # float32 when quantized
        return weight + update.to(weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.pock_delta:
                result = add_sparse_delta(
                    result, x, self.pock_delta[adapter], self.pock_indices[adapter], self.pock_axis[adapter]
                )
        return result

    def __repr__(self) -> str:
        return "pock." + super().__repr__()
