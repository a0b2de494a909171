"""PEFT's ``PeftModel`` surface for :class:`~adalora_fast.AdaLoraModel`, kept out of ``model.py``.

An ``AdaLoraModel`` plays both of PEFT's roles: ``peft.PeftModel`` (what ``get_peft_model`` returns) and
the tuner ``peft.tuners.AdaLoraModel`` (PEFT's ``peft_model.base_model``), with one adapter. This mixin
holds the names a PEFT AdaLoRA script uses (adapter bookkeeping, parameter counts, disabling the
adapters) and :data:`UNSUPPORTED`, the PEFT names it does not have, each with what to do instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from .layer import SVDLinear

__all__ = ["LOAD_OTHER_ADAPTER", "UNSUPPORTED", "PeftModelApi", "unsupported_error"]

_ONE = "an AdaLoraModel holds one adapter"
# load_adapter exists for that one adapter only (in place); another name gets this answer.
LOAD_OTHER_ADAPTER = f"{_ONE}; load another adapter with AdaLoraModel.from_pretrained(base_model, path)"
# Public names of peft.PeftModel, PeftModelForCausalLM/Seq2SeqLM, BaseTuner, LoraModel and PEFT's
# AdaLoraModel (and of transformers' PeftAdapterMixin, which AdaLoraModel.__getattr__ would otherwise reach
# on the wrapped model, with misleading errors) that AdaLoraModel does not have -> what to do instead.
UNSUPPORTED: dict[str, str] = {
    "add_adapter": f"{_ONE}; wrap another base model for another adapter",
    "delete_adapter": f"{_ONE}; unload() gives the base model back without it",
    "enable_peft_hotswap": f"{_ONE}; hotswapping adapters is not supported",
    "enable_adapters": "use enable_adapter_layers()",
    "disable_adapters": "use the disable_adapter() context manager or disable_adapter_layers()",
    "get_adapter_state_dict": "save_pretrained(dir) writes the adapter; state_dict() holds every lora_A/E/B",
    "get_layer_status": "use kept_ranks(), merged, and each SVDLinear's disable_adapters flag",
    "get_model_status": "use kept_ranks(), merged, and each SVDLinear's disable_adapters flag",
    "create_or_update_model_card": "save_pretrained(dir) writes the model card",
    "push_to_hub": "save_pretrained(dir), then upload the folder (huggingface_hub.upload_folder)",
    "supports_lora_conversion": "export_lora(dir) writes the adapter as a standard PEFT LoRA adapter",
    "subtract_mutated_init": "it converts PiSSA/OLoRA LoRA adapters, which AdaLoRA does not have",
    "get_prompt": "it is for prompt learning, not AdaLoRA",
    "get_prompt_embedding_to_save": "it is for prompt learning, not AdaLoRA",
    "inject_adapter": "the constructor, AdaLoraModel(model, config), injects the adapters",
    "resize_modules_by_rank_pattern": "compact(optimizer) drops the masked ranks in place",
    "resize_state_dict_by_rank_pattern": "save_pretrained(dir) writes the kept ranks only",
    "rankallocator": "call update_and_allocate(step); the allocator (another API) is rank_allocator",
    "get_model_config": "read model.config",
    "tuner_layer_cls": "the adapted layers are adalora_fast.SVDLinear (not PEFT tuner layers)",
    "target_module_mapping": "see adalora_fast.targets.PEFT_DEFAULT_TARGETS",
    "special_peft_forward_args": "forward takes the wrapped model's arguments only",
    "base_model_prepare_inputs_for_generation": "use prepare_inputs_for_generation (the wrapped model's)",
    "targeted_parameter_names": "AdaLoRA adapts modules, not parameters: see targeted_module_names",
    "uses_shared_state": "it flags tuners with weights shared across layers (VeRA); AdaLoRA has none",
}


def unsupported_error(name: str) -> AttributeError:
    return AttributeError(f"AdaLoraModel does not support PEFT's {name!r}: {UNSUPPORTED[name]}")


class PeftModelApi:
    """PEFT-compatible names, mixed into ``AdaLoraModel`` (which provides ``model``, ``adapter_name``,
    ``adalora_config``, ``adapted_names``, ``adapted_layers``, ``is_trainable``, ``_sync_rank_pattern``)."""

    peft_type = "ADALORA"  # PEFT's PeftType.ADALORA is a str enum: equal to this string
    prefix = "lora_"  # PEFT's tuner prefix: every adapter parameter name holds it

    # ---- adapter bookkeeping: one adapter, named adapter_name ------------------------------------
    @property
    def base_model(self) -> Any:
        """The tuner, as ``peft_model.base_model`` is in PEFT: this model itself, so that PEFT's
        ``model.base_model.update_and_allocate(step)`` works; ``base_model.model`` is the wrapped model."""
        return self

    @property
    def peft_config(self) -> dict[str, Any]:
        """``{adapter_name: config}``; the config's ``rank_pattern`` is brought up to date first."""
        return {self.adapter_name: self.active_peft_config}

    @property
    def active_peft_config(self) -> Any:
        self._sync_rank_pattern()
        return self.adalora_config

    @property
    def active_adapter(self) -> str:
        return self.adapter_name

    @property
    def active_adapters(self) -> list[str]:
        return [self.adapter_name]

    @property
    def trainable_adapter_name(self) -> str:
        return self.adapter_name

    @property
    def targeted_module_names(self) -> list[str]:
        return list(self.adapted_names)

    @property
    def modules_to_save(self) -> set[str] | None:
        return set(self.adalora_config.modules_to_save or []) or None  # PEFT: None when there are none

    @property
    def base_model_torch_dtype(self) -> Any:
        return getattr(self.model, "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        modules = self._adapter_modules()
        return not (modules and all(m.disable_adapters for m in modules))

    def _check_adapter_names(self, names: str | Sequence[str] | None, where: str) -> None:
        if names is None:
            return
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name != self.adapter_name:
                raise ValueError(
                    f"Adapter {name} not found. {where}: {_ONE}, available adapters: {[self.adapter_name]}"
                )

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Our adapter only (else ``ValueError``, as PEFT). As PEFT, the adapter becomes trainable, or
        frozen with ``inference_mode=True``; a model loaded for inference stays frozen."""
        self._check_adapter_names([adapter_name], "set_adapter")
        self._set_adapter_trainable(self.is_trainable and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Gradients on or off for the adapter (A, E, B and the modules to save) when ``adapter_names``
        names it (other names are ignored, as in PEFT)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if self.adapter_name in names:
            self._set_adapter_trainable(requires_grad)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """PEFT refuses it for AdaLoRA, with this error."""
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")

    # ---- parameter counts -------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT counts them (``ranknum`` included in all)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 partitions
                n = p.ds_numel
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ---- disabling the adapters (PEFT's LoRA layer semantics) ------------------------------------------
    def disable_adapter_layers(self) -> None:
        """Every layer runs its base layer alone (a merged layer unmerges on its next forward, as in
        PEFT), modules to save their original; the adapter's parameters stop requiring gradients."""
        for m in self._adapter_modules():
            m.disable_adapters = True
        self._set_adapter_trainable(False)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the adapter's parameters require gradients again, unless
        the model was loaded for inference (PEFT makes them trainable then too)."""
        for m in self._adapter_modules():
            m.disable_adapters = False
        self._set_adapter_trainable(self.is_trainable)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside: outputs are the frozen base model's. The regulariser is still
        added to a returned loss, as PEFT's AdaLoraModel.forward does. On exit (exception included)
        each module's flag and each adapter parameter's ``requires_grad`` are restored; layers that
        unmerged inside stay unmerged (as in PEFT)."""
        flags = [(m, m.disable_adapters) for m in self._adapter_modules()]
        grads = [(p, p.requires_grad) for p in self._adapter_params()]
        try:
            self.disable_adapter_layers()
            yield
        finally:
            for m, flag in flags:
                m.disable_adapters = flag
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """As PEFT (unquantised models): make the input embeddings' output require grad, so that
        reentrant gradient checkpointing (whose inputs are otherwise all frozen) reaches the adapters."""
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return model

    # ---- helpers ---------------------------------------------------------------------------------
    def _adapter_modules(self) -> list[nn.Module]:
        """The adapted layers and the modules-to-save wrappers: each has a ``disable_adapters`` flag."""
        layers: list[nn.Module] = [m for _, m in self.adapted_layers]
        return layers + [self.model.get_submodule(n) for n in getattr(self, "saved_module_names", [])]

    def _adapter_params(self) -> Iterator[nn.Parameter]:
        """What the adapter trains: each layer's A, E, B and each module to save's trained copy."""
        for m in self._adapter_modules():
            if isinstance(m, SVDLinear):
                yield from (m.lora_A, m.lora_E, m.lora_B)
            else:
                yield from m.modules_to_save.parameters()

    def _set_adapter_trainable(self, requires_grad: bool) -> None:
        for p in self._adapter_params():
            p.requires_grad_(requires_grad)
