"""The frozen-prefix cache: hidden states at the depth cut, kept per example, so later epochs skip the prefix.

Below the depth cut nothing trains, so the hidden state entering the cut layer is a fixed function of each
example's tokens. The first time a batch is seen it runs as usual and the cut layer's input is stored per row (only
the non-padding positions). When every row of a later batch is cached, the layers below the cut are skipped and the
stored states are fed to the cut layer. Padding positions get zeros: they never reach a real position (the
attention mask hides them as keys, and the loss ignores them), so the loss and gradients are those of the uncached
run up to float rounding (tests/test_prefix_cache.py).

The cache is only used where it is exact: a Pock model whose cut is above layer 0 and nothing below it trains;
called with `input_ids` and no `inputs_embeds`, KV cache or intermediate outputs (generation and
`output_hidden_states` run the whole model), and with `position_ids` only as packed rows carry them (no attention
mask): each packed example is then an entry of its own, shared with the same example in a padded batch. It empties itself when the cut moves or the prefix weights change
(checked by a content digest whenever a prefix parameter's version counter, storage or sampled values move: an
edit through `.data` that changes none of a tensor's 64 sampled values goes unseen; call `clear()` after such
surgery). Entries live in memory or, with
`directory`, as one safetensors file each (written atomically, never pickle), up to `max_mb`; past the limit new
examples simply run uncached.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..io.files import atomic_write_bytes, atomic_write_text, check_format_version, read_json_object
from ..tuner.depth_cut import find_decoder_layers
from ..tuner.fingerprint import weights_digest
from ..tuner.forward_patch import ForwardPatch, patch_forward, unpatch_forward

FORMAT_VERSION = 1
CACHE_TAG = "_pock_forward_before_prefix_cache"
META_FILE = "prefix_cache.json"
# values of each prefix tensor compared on every batch (see `_value_sample`)
SAMPLED_VALUES = 64
# decoder arguments under which the prefix cannot be skipped
BYPASS_KWARGS = (
    "inputs_embeds",
    "position_ids",
    "cache",
    "past_key_values",
    "output_hidden_states",
    "output_attentions",
)


@dataclass
class PrefixCacheStats:
    """Counts since the cache was created: batches served from the cache (`hit_batches`) or run through the
    prefix (`miss_batches`), rows stored, rows not stored because the size limit was reached, and invalidations."""

    hit_batches: int = 0
    miss_batches: int = 0
    stored_rows: int = 0
    rows_over_limit: int = 0
    invalidations: int = 0


@dataclass
class _Batch:
    cut: int
    keys: list[str]
    spans: list[tuple[int, int, int]]  # (row, start, length) of each example's real tokens
    stored: list[torch.Tensor] | None  # every row's stored states when the whole batch is cached


class _CachedLayerForward(ForwardPatch):
    """Decoder layer `index`'s forward while `cache` serves the model."""

    tag = CACHE_TAG

    def __init__(self, layer: nn.Module, index: int, cache: PrefixCache) -> None:
        super().__init__(layer)
        self.index = index
        self.cache = cache

    def __call__(self, *args, **kwargs):
        return self.cache._layer_forward(self.original(), self.index, *args, **kwargs)


class PrefixCache:
    """Hidden states at the depth cut per example, in memory or under `directory`, up to `max_mb` megabytes.

    Use `cache.attach(model)` on a model returned by `get_pock_model`; `cache.detach()` removes it. `stats` counts
    hits and misses; `size_mb` is what the stored states take (MB = 2**20 bytes).

    Raises:
        ValueError: `max_mb` is not positive, or `directory` holds a cache of a newer format.
    """

    def __init__(self, max_mb: float = 1024.0, directory: str | os.PathLike | None = None) -> None:
        if not max_mb > 0:
            raise ValueError(f"max_mb must be a positive number of megabytes, got {max_mb!r}.")
        self.max_bytes = int(max_mb * 2**20)
        self.directory = Path(directory) if directory is not None else None
        self.stats = PrefixCacheStats()
        self._entries: dict[str, torch.Tensor | int] = {}  # key -> tensor (memory) or its byte size (disk)
        self._bytes = 0
        self._validity: dict | None = None
        self._prefix_stamp: tuple | None = None
        self._batch: _Batch | None = None
        self._model: nn.Module | None = None
        self._handles: list = []
        if self.directory is not None:
            self._open_directory()

    # --- storage ---------------------------------------------------------------------------------------------------

    @property
    def size_mb(self) -> float:
        return self._bytes / 2**20

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (and delete the files of a disk cache)."""
        if self.directory is not None:
            for key in self._entries:
                (self.directory / f"{key}.safetensors").unlink(missing_ok=True)
        self._entries, self._bytes = {}, 0

    def _get(self, key: str) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is None or isinstance(entry, torch.Tensor):
            return entry
        try:
            return load_file(self.directory / f"{key}.safetensors")["hidden"]
        except Exception:  # noqa: BLE001 -- a damaged file is a miss, never a crash or a wrong value
            del self._entries[key]
            self._bytes -= entry
            return None

    def _put(self, key: str, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self._bytes + size > self.max_bytes:
            self.stats.rows_over_limit += 1
            return
        if self.directory is None:
            self._entries[key] = hidden.clone()
        else:
            atomic_write_bytes(self.directory / f"{key}.safetensors", save({"hidden": hidden.contiguous().cpu()}))
            self._entries[key] = size
        self._bytes += size
        self.stats.stored_rows += 1

    def _open_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / META_FILE
        if not meta_path.exists():
            return
        meta = read_json_object(meta_path, "Prefix cache metadata")
        check_format_version(meta, FORMAT_VERSION, "prefix cache", str(meta_path), "delete the folder to start afresh")
        self._validity = meta.get("validity")
        for path in sorted(self.directory.glob("*.safetensors")):
            size = path.stat().st_size
            if self._bytes + size <= self.max_bytes:
                self._entries[path.name.removesuffix(".safetensors")] = size
                self._bytes += size

    def _set_validity(self, validity: dict) -> None:
        """Empty the cache when it was filled for another cut, prefix or dtype; remember the new validity."""
        if validity == self._validity:
            return
        if self._entries:
            self.stats.invalidations += 1
        self.clear()
        self._validity = validity
        if self.directory is not None:
            meta = {"format_version": FORMAT_VERSION, "validity": validity}
            atomic_write_text(self.directory / META_FILE, json.dumps(meta, indent=2))

    # --- attaching to a model ------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> PrefixCache:
        """Serve `model` (returned by `get_pock_model`) from this cache until `detach()`; returns the cache."""
        tuner = getattr(model, "base_model", None)
        if not hasattr(tuner, "refresh_cut"):
            raise TypeError("PrefixCache.attach expects a model returned by pock_hf.get_pock_model.")
        self.detach()
        self._model = tuner
        transformer = tuner.model
        decoder = transformer.get_decoder() if hasattr(transformer, "get_decoder") else transformer
        _, layers = find_decoder_layers(decoder)
        self._layers = layers
        self._embeddings = transformer.get_input_embeddings()
        self._handles = [
            decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True),
            decoder.register_forward_hook(self._after_decoder, always_call=True),
        ]
        for index, layer in enumerate(layers):
            patch_forward(_CachedLayerForward(layer, index, self))
        return self

    def detach(self) -> None:
        """Stop serving the attached model (the stored entries stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._model is not None:
            for layer in self._layers:
                unpatch_forward(layer, CACHE_TAG)
        self._model, self._batch = None, None

    def _before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._batch = None
        input_ids = args[0] if args else kwargs.get("input_ids")
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        # packed rows (position_ids, no mask) are served per example; other explicit positions are not
        bypass = [name for name in BYPASS_KWARGS if name != "position_ids" or mask is not None]
        if input_ids is None or any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in bypass):
            return
        cut = self._model.refresh_cut()
        if not (0 < cut.layer < len(self._layers)) or not cut.detach_input:
            return
        prefix = [self._embeddings, *self._layers[: cut.layer]]
        self._check_prefix(cut.layer, prefix)
        if positions is not None:
            keys, spans = _packed_keys(input_ids, positions)
        else:
            rows = _row_keys(input_ids, mask if mask is not None else torch.ones_like(input_ids))
            if rows is None:
                return
            keys, spans = rows
        stored = [self._get(key) for key in keys] if all(key in self._entries for key in keys) else None
        hit = stored is not None and all(hidden is not None for hidden in stored)
        self._batch = _Batch(cut=cut.layer, keys=keys, spans=spans, stored=stored if hit else None)
        if hit:
            self.stats.hit_batches += 1
        else:
            self.stats.miss_batches += 1

    def _after_decoder(self, module: nn.Module, args: tuple, output) -> None:
        self._batch = None

    def _check_prefix(self, cut: int, prefix: list[nn.Module]) -> None:
        parameters = [p for module in prefix for p in module.parameters()]
        # cheap: in-place updates bump `_version`, replaced tensors change `data_ptr`, and a sample of every tensor's
        # values catches writes through `.data`, which move neither
        stamp = (cut, tuple((p.data_ptr(), p._version, _value_sample(p)) for p in parameters))
        if stamp == self._prefix_stamp:
            return
        digest = weights_digest(nn.ModuleList(prefix))
        dtype = str(parameters[0].dtype) if parameters else ""
        self._set_validity({"cut": cut, "prefix_weights": digest, "dtype": dtype})
        self._prefix_stamp = stamp

    def _layer_forward(self, forward: Callable, index: int, hidden_states: torch.Tensor, *args, **kwargs):
        """Decoder layer `index`'s forward (`forward`) while this cache serves its model."""
        batch = self._batch
        if batch is None or index >= batch.cut:
            return forward(hidden_states, *args, **kwargs)
        if batch.stored is not None:
            # the prefix is skipped: the last layer below the cut hands the stored states to the cut layer
            return self._assemble(batch, hidden_states) if index == batch.cut - 1 else hidden_states
        output = forward(hidden_states, *args, **kwargs)
        if index == batch.cut - 1:
            self._store(batch, output)
        return output

    def _assemble(self, batch: _Batch, like: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros_like(like)
        for stored, (row, start, length) in zip(batch.stored, batch.spans):
            hidden[row, start : start + length] = stored.to(device=like.device, dtype=like.dtype)
        return hidden

    def _store(self, batch: _Batch, hidden: torch.Tensor) -> None:
        for key, (row, start, length) in zip(batch.keys, batch.spans):
            if key not in self._entries:
                self._put(key, hidden[row, start : start + length].detach())


def _value_sample(parameter: torch.Tensor) -> bytes:
    """`SAMPLED_VALUES` values spread evenly over the tensor, as bytes: what a `.data` edit of a whole tensor (or of
    any sampled element) changes."""
    flat = parameter.detach().reshape(-1)
    count = min(SAMPLED_VALUES, flat.numel())
    # integer positions: a float linspace over tens of millions of elements rounds its last one out of range
    positions = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    return flat[positions].float().cpu().numpy().tobytes()


def _row_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[list[str], list[tuple[int, int, int]]] | None:
    """A content key and the (row, start, length) span of the real tokens of each row; None when a row is not one
    contiguous run of real tokens, which the cache does not serve (packed rows come with `position_ids`).

    The key covers the tokens and the position of the first one, because positions (RoPE) depend on it.
    """
    keys, spans = [], []
    for row, (ids, mask) in enumerate(zip(input_ids.cpu(), attention_mask.cpu())):
        real = mask.nonzero().flatten()
        start, length = (int(real[0]), len(real)) if len(real) else (0, 0)
        if length and int(real[-1]) - start + 1 != length:
            return None
        keys.append(_example_key(ids[start : start + length], first_position=start))
        spans.append((row, start, length))
    return keys, spans


def _packed_keys(input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Keys and (row, start, length) spans of the examples of packed rows: a new example starts wherever the
    positions do not count up by one (as transformers splits them for its block-causal mask). An example packed at
    positions 0..L-1 gets the key of the same example right-padded in a padded batch: they share cache entries."""
    keys, spans = [], []
    positions = position_ids.expand_as(input_ids).cpu()
    for row, (ids, row_positions) in enumerate(zip(input_ids.cpu(), positions)):
        starts = [0, *(torch.nonzero(row_positions.diff() != 1).flatten() + 1).tolist(), len(ids)]
        for start, end in itertools.pairwise(starts):
            keys.append(_example_key(ids[start:end], first_position=int(row_positions[start])))
            spans.append((row, start, end - start))
    return keys, spans


def _example_key(ids: torch.Tensor, first_position: int) -> str:
    digest = hashlib.sha256(ids.numpy().tobytes())
    digest.update(f"|{first_position}|{ids.dtype}".encode())
    return digest.hexdigest()[:32]
