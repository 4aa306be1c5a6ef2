"""`SensitivityTable`: how much updating each unit (layer x module x channel ratio) alone improves the task, what it
costs in damage to general answers, and (for the gain model) how much a few whole schemes improved it."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..io.files import atomic_write_text, check_format_version, dataclass_from_json, read_json_object, save_figure
from ..tuner.fingerprint import check_model_fingerprint, model_fingerprint
from .gain_model import SchemeMeasurement

TABLE_FORMAT_VERSION = 2
WHOLE_LAYER = "*"
LLAMA_LAYER_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class SensitivityRow:
    """One measured unit.

    `module` is the path inside the decoder layer (`"mlp.up_proj"`), or `"*"` for all its linear modules at once.
    `gain` is the improvement of `metric` over the frozen model (loss decrease, or accuracy increase), higher is
    better; `steps` is the number of fine-tuning steps (measured) or backward passes (proxy) behind it. `damage` is
    the loss increase (nats per token) on replay data, general answers the model already gives, after tuning the
    unit alone (measured) or its estimate (proxy); None when no replay data was given.
    """

    layer: int
    module: str
    ratio: float
    gain: float
    method: str
    steps: int
    metric: str
    damage: float | None = None


@dataclass
class SensitivityTable:
    """Rows plus what they were measured on.

    `layers_name` is the decoder stack's name (`"model.layers"`) and `layer_modules` the linear modules inside a
    layer, so a unit maps to full module names; `baseline` is the frozen model's metric and `replay_baseline` its
    loss on the replay data (None without); `channel_importance` maps full module names to per-channel scores (proxy
    mode), usable as `PockConfig.channel_indices`. `schemes` are whole schemes trained for real, the points the gain
    model is fitted on (`planning.calibration`).
    """

    rows: list[SensitivityRow]
    model_fingerprint: dict
    data_fingerprint: str
    layers_name: str = "model.layers"
    layer_modules: tuple[str, ...] = LLAMA_LAYER_MODULES
    baseline: float | None = None
    replay_baseline: float | None = None
    settings: dict = field(default_factory=dict)
    channel_importance: dict[str, list[float]] = field(default_factory=dict)
    schemes: list[SchemeMeasurement] = field(default_factory=list)
    format_version: int = TABLE_FORMAT_VERSION

    def module_names(self, layer: int, module: str) -> list[str]:
        """Full module names of a unit (`"*"` expands to every linear module of the layer)."""
        modules = self.layer_modules if module == WHOLE_LAYER else (module,)
        return [f"{self.layers_name}.{layer}.{m}" for m in modules]

    def check_model(self, model: nn.Module) -> None:
        """Raise `ValueError` naming both fingerprints unless the table was measured on `model` (unwrapped)."""
        check_model_fingerprint(self.model_fingerprint, model_fingerprint(model), "sensitivity table")

    # --- files -------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layer_modules"] = list(self.layer_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "table") -> SensitivityTable:
        """The table in `data` (what `to_dict` gives), every field type-checked.

        Raises:
            ValueError: naming `source` and the field: another format version, a missing, unknown or mistyped field.
        """
        check_format_version(
            data, TABLE_FORMAT_VERSION, "sensitivity-table", source, "measure the table again with this version"
        )
        return dataclass_from_json(cls, data, source)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically). Floats round-trip exactly."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SensitivityTable:
        return cls.from_dict(read_json_object(path, "Sensitivity table"), source=os.fspath(path))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One line per row: layer, module, ratio, gain, method, steps, metric, damage."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(SensitivityRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) for row in self.rows)
        return atomic_write_text(path, buffer.getvalue())

    def plot_heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """A PNG heatmap of gain, layers x modules, one panel per ratio."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        ratios = sorted({row.ratio for row in self.rows})
        modules = sorted({row.module for row in self.rows}, key=_module_order(self.layer_modules))
        layers = sorted({row.layer for row in self.rows})
        figure, axes = plt.subplots(
            1, len(ratios), figsize=(1.2 + 1.1 * len(modules) * len(ratios), 1.5 + 0.22 * len(layers)), squeeze=False
        )
        finite = [row.gain for row in self.rows if math.isfinite(row.gain)]
        limit = max((abs(g) for g in finite), default=1.0) or 1.0
        for axis, ratio in zip(axes[0], ratios):
            grid = np.full((len(layers), len(modules)), np.nan)
            for row in self.rows:
                if row.ratio == ratio:
                    grid[layers.index(row.layer), modules.index(row.module)] = row.gain
            image = axis.imshow(grid, aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit, origin="lower")
            axis.set(title=f"ratio {ratio:g}", xticks=range(len(modules)), yticks=range(len(layers)))
            axis.set_xticklabels([m.rpartition(".")[2] for m in modules], rotation=60, fontsize=7)
            axis.set_yticklabels(layers, fontsize=6)
            axis.set_ylabel("decoder layer")
        metric = self.rows[0].metric if self.rows else "metric"
        figure.colorbar(image, ax=axes[0].tolist(), label=f"gain ({metric} improvement)")
        figure.suptitle(title or f"{self.rows[0].method if self.rows else ''} sensitivity")
        return save_figure(figure, path)


def _module_order(layer_modules: tuple[str, ...]):
    order = {name: index for index, name in enumerate((*layer_modules, WHOLE_LAYER))}
    return lambda module: order.get(module, len(order))
