"""`PockModel`: the PEFT tuner that injects channel-sparse layers and installs the depth cut."""

from __future__ import annotations

import contextlib
import copy
import difflib
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .config import PockConfig
from .depth_cut import (
    DepthCut,
    compute_cut,
    find_decoder_layers,
    install_depth_cut,
    layer_index_of,
    remove_depth_cut,
    set_checkpointing,
)
from .fingerprint import architecture_fingerprint, check_fingerprint
from .head_input import install_contiguous_head_input, remove_contiguous_head_input
from .layer import Linear, PockLayer
from .loss import install_label_only_loss, remove_label_only_loss
from .quantize import frozen_weight, quantize_frozen_linears
from .sparse_backward import channel_count, select_channels


@dataclass(frozen=True)
class UpdatedModule:
    """One updated linear module: its channel ratio, axis and the selected channel indices (sorted)."""

    ratio: float
    axis: str
    channels: tuple[int, ...]


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the modules Pock can update: plain `nn.Linear`s and already-wrapped Pock layers."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, PockLayer) or (isinstance(module, nn.Linear) and not name.endswith(".base_layer"))
    ]


def validate_scheme_for_model(model: nn.Module, config: PockConfig) -> None:
    """Raise `ValueError` naming the scheme entry that is not an updatable linear module of `model`."""
    valid = linear_module_names(model)
    valid_set = set(valid)
    modules = dict(model.named_modules())
    for name, ratio in config.scheme.items():
        if name in valid_set:
            _check_not_tied(model, name)
            _check_indices(model.get_submodule(name), name, ratio, config)
            continue
        if name in modules:
            raise ValueError(
                f"Scheme entry {name!r} is a {type(modules[name]).__name__}, not a linear layer; Pock updates "
                f"nn.Linear modules such as {valid[0]!r} ({len(valid)} in this model)."
            )
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Scheme entry {name!r} is not a module of {type(model).__name__}.{hint} Valid entries are the full names "
            f"of its {len(valid)} linear modules, e.g. {valid[0]!r} ... {valid[-1]!r}."
        )


def _check_not_tied(model: nn.Module, name: str) -> None:
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_embeddings is not None and output_embeddings is model.get_submodule(name):
        embed = model.get_input_embeddings()
        if embed is not None and embed.weight is output_embeddings.weight:
            raise ValueError(
                f"Scheme entry {name!r} shares its weight with the input embeddings (tie_word_embeddings): merging "
                "its update would change the embeddings too. Update the decoder layers' linear modules instead."
            )


def _check_indices(module: nn.Module, name: str, ratio: float, config: PockConfig) -> None:
    indices = (config.channel_indices or {}).get(name)
    if indices is None:
        return
    base = module.get_base_layer() if isinstance(module, PockLayer) else module
    channels = base.out_features if config.channel_axis == "out" else base.in_features
    expected = channel_count(ratio, channels)
    if len(indices) != expected or len(set(indices)) != len(indices):
        raise ValueError(
            f"`channel_indices[{name!r}]` holds {len(indices)} indices ({len(set(indices))} distinct); ratio {ratio} "
            f"of {channels} {config.channel_axis}-channels needs {expected} distinct ones."
        )
    if not all(isinstance(i, int) and 0 <= i < channels for i in indices):
        raise ValueError(f"`channel_indices[{name!r}]` must be integers in [0, {channels}).")


def norm_module_names(model: nn.Module, layers_name: str, layer_indices: set[int]) -> list[str]:
    """Names of the normalisation modules (RMSNorm etc.) inside the given decoder layers.

    A norm that PEFT already wraps for another adapter's `modules_to_save` is named by its wrapper: PEFT adds the new
    adapter's copy to a wrapper it matches by name, while the norm inside would get a second wrapper nested in the
    first."""
    names: list[str] = []
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if name.startswith(tuple(wrappers)):
            continue  # inside a wrapper: its original module and the adapters' copies
        if isinstance(module, ModulesToSaveWrapper):
            wrappers.append(f"{name}.")
            module = module.original_module
        if "Norm" in type(module).__name__ and layer_index_of(name, layers_name) in layer_indices:
            names.append(name)
    return names


class PockModel(BaseTuner):
    """Creates a Pock (sparse channel update) model from a transformers Llama-family model.

    Use `pock_hf.get_pock_model(model, config)`; then the wrapped model exposes `cut_layer` and `updated_modules`.
    """

    prefix: str = "pock_"
    tuner_layer_cls = PockLayer
    target_module_mapping: ClassVar[dict] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """PEFT's injection of `adapter_name`, between Pock's own preparation and installation, for every adapter.

        PEFT runs `_pre_injection_hook` and `_post_injection_hook` only around the first adapter (in
        `BaseTuner.__init__`), while `PeftModel.add_adapter` and `load_adapter` call this method alone; so Pock's setup
        lives here (as UniLoRA's does), and an added or loaded adapter is checked, fingerprinted and given its norms
        exactly as the first one is.

        Raises:
            ValueError: from `_prepare_adapter`, before anything is injected.
        """
        # the adapter keeps a copy of its config, which records this base model: the caller's may wrap another
        # base, as `get_pock_model` leaves its argument alone
        config = self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        self._prepare_adapter(model, config)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        self._install(model, config)

    def _prepare_adapter(self, model: nn.Module, config: PockConfig) -> None:
        """Check `config` against `model` and complete it: record the base-model fingerprint, and with `train_norms`
        add the updated layers' norms to `modules_to_save`.

        Raises:
            ValueError: a scheme entry is not an updatable linear module of `model`, its `channel_indices` do not
                fit, or the config records another base model's fingerprint (a saved adapter loaded onto the wrong
                base).
        """
        validate_scheme_for_model(model, config)
        fingerprint = architecture_fingerprint(model, config.scheme)
        if config.base_model_fingerprint:
            check_fingerprint(config.base_model_fingerprint, fingerprint)
        config.base_model_fingerprint = fingerprint
        layers_name, _ = find_decoder_layers(model)
        if config.train_norms:
            updated_layers = {layer_index_of(name, layers_name) for name in config.scheme}
            norms = norm_module_names(model, layers_name, updated_layers)
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(norms))

    def _prepare_adapter_config(self, peft_config: PockConfig, model_config: dict) -> PockConfig:
        return peft_config  # the scheme names every target explicitly

    @staticmethod
    def _check_target_module_exists(peft_config: PockConfig, key: str) -> bool:
        return key in peft_config.scheme

    def _create_and_replace(
        self,
        peft_config: PockConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        ratio = peft_config.scheme[current_key]
        axis = peft_config.channel_axis
        base = target.get_base_layer() if isinstance(target, PockLayer) else target
        channels = base.out_features if axis == "out" else base.in_features
        given = (peft_config.channel_indices or {}).get(current_key)
        if given is not None:
            indices = torch.tensor(sorted(given), dtype=torch.long)
        else:
            weight = frozen_weight(base)
            indices = select_channels(weight, channel_count(ratio, channels), axis, peft_config.channel_selection)
        if isinstance(target, Linear):
            target.update_layer(adapter_name, ratio, axis, indices, init_weights=peft_config.init_weights)
            return
        new_module = Linear(target, adapter_name, ratio, axis, indices, init_weights=peft_config.init_weights)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _install(self, model: nn.Module, config: PockConfig) -> None:
        """Install the depth cut and the forward hooks (once per model: every adapter shares them), then apply the
        options of `config` that act on the whole model: quantized frozen weights, the label-only loss and
        checkpointing. An adapter added later can turn these on, not off (the first adapter may be training); the
        label-only loss then chunks as the latest adapter that asks for it says."""
        if not hasattr(self, "_depth_cut"):
            self._install_depth_cut_and_hooks(model)
        if config.quantize_frozen:
            # after injection, so channels were chosen on the full-precision weights
            quantize_frozen_linears(find_decoder_layers(model)[1], config.quantize_frozen)
        if config.label_only_loss and hasattr(model, "get_output_embeddings") and model.get_output_embeddings():
            install_label_only_loss(model, config.loss_chunk_size)
        if config.gradient_checkpointing:
            set_checkpointing(model, True)

    def _install_depth_cut_and_hooks(self, model: nn.Module) -> None:
        self._layers_name, layers = find_decoder_layers(model)
        self._num_layers = len(layers)
        # one cut object, shared by the tuner (which refreshes it) and every layer's forward (which reads it)
        self._depth_cut = DepthCut(layer=len(layers))
        self._backward_watch: list = []  # hook handles of the pending check (see `_watch_first_backward`)
        self._backward_verified = False
        install_depth_cut(layers, self._depth_cut)
        install_contiguous_head_input(model)
        # Hooks on the transformers model itself, because PeftModel (no task type) calls it directly, not us. They are
        # bound methods of this tuner, which deepcopy rebinds to the copy's tuner.
        self._forward_hook_handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward),
        ]

    # --- the depth cut -------------------------------------------------------------------------------------------

    def refresh_cut(self) -> DepthCut:
        """Recompute the cut from the parameters that currently require grad (cheap: one pass over names)."""
        fresh = compute_cut(self.model.named_parameters(), self._layers_name, self._num_layers)
        self._depth_cut.layer, self._depth_cut.detach_input = fresh.layer, fresh.detach_input
        return self._depth_cut

    @property
    def cut_layer(self) -> int:
        """Index of the deepest (lowest) decoder layer that holds a trainable parameter; the number of decoder
        layers when none does. Nothing below it records autograd state or runs backward."""
        return self.refresh_cut().layer

    @property
    def updated_modules(self) -> dict[str, UpdatedModule]:
        """Base-model module name -> ratio, axis and selected channel indices, for the active adapter."""
        updated = {}
        for name, module in self.model.named_modules():
            if isinstance(module, PockLayer):
                for adapter in module.active_adapters:
                    if adapter in module.pock_delta:
                        channels = tuple(int(i) for i in module.pock_indices[adapter].tolist())
                        updated[name] = UpdatedModule(module.pock_ratio[adapter], module.pock_axis[adapter], channels)
        return updated

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PeftModel's forward and generate enter this with their keyword arguments. Mixed-adapter batches
        (`adapter_names=`) would need each row routed through its own deltas; Pock refuses them rather than let PEFT
        ignore the argument and run every row through the active adapter."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "Pock adapters do not support mixed-adapter batches (adapter_names=...): every row would run through "
                "the active adapter. Call set_adapter(name) and run each adapter's rows as a batch of their own."
            )
        yield

    # --- forward: fail loudly when training reaches no adapter parameter ---------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        self.refresh_cut()

    def _after_forward(self, module: nn.Module, args: tuple, output) -> None:
        if module.training and torch.is_grad_enabled() and not self._backward_verified:
            self._watch_first_backward(output)

    def _watch_first_backward(self, output) -> None:
        """After the next backward through `output` (`.backward()` or `torch.autograd.grad`), check that some
        trainable parameter got a gradient. Each training forward before the first successful check replaces the
        previous watch, so a forward that is never backpropagated does not leave the check waiting for good."""
        self._stop_watching()
        values = output.values() if hasattr(output, "values") else [output]
        tensor = next((v for v in values if torch.is_tensor(v) and v.requires_grad), None)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if tensor is None or not trainable:
            return
        received: list[bool] = []
        # tensor hooks, not post-accumulate ones: they also fire for torch.autograd.grad, which fills no .grad
        handles = [p.register_hook(lambda grad: received.append(True)) for p in trainable]

        def check() -> None:
            self._stop_watching()
            if not received:
                raise RuntimeError(
                    "The backward pass reached none of the trainable Pock parameters, so training would update "
                    "nothing. This happens when activation checkpointing (use_reentrant=True) wraps a layer whose "
                    "inputs do not require grad, or when the loss does not depend on the updated modules. Use "
                    "gradient_checkpointing_kwargs={'use_reentrant': False} or check the scheme."
                )
            self._backward_verified = True

        handles.append(
            tensor.register_hook(lambda grad: torch.autograd.Variable._execution_engine.queue_callback(check))
        )
        self._backward_watch = handles

    def _stop_watching(self) -> None:
        for handle in self._backward_watch:
            handle.remove()
        self._backward_watch = []

    # --- unloading gives back a plain transformers model -------------------------------------------------------------

    def _unload_and_optionally_merge(self, *args, **kwargs):
        remove_depth_cut(find_decoder_layers(self.model)[1])
        remove_label_only_loss(self.model)
        remove_contiguous_head_input(self.model)
        for handle in self._forward_hook_handles:
            handle.remove()
        return super()._unload_and_optionally_merge(*args, **kwargs)
