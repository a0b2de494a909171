"""What PEFT trains and saves beside the adapters: ``modules_to_save`` (whole modules, e.g. a task head)
and, with ``bias="all"`` / ``"lora_only"``, base biases.

Each matching module is wrapped as PEFT wraps it: the frozen ``original_module`` and a trainable copy
``modules_to_save[adapter_name]``, which the forward uses unless adapters are disabled. The parameter
names (``<module>.modules_to_save.default.weight``) and the checkpoint keys
(``base_model.model.<module>.weight``, the copy's state dict) are PEFT's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .targets import replace_module

__all__ = [
    "HEAD_MODULES",
    "ModulesToSaveWrapper",
    "bias_names",
    "modules_to_save_for",
    "wrap_modules_to_save",
]

# The heads PEFT's task models add to modules_to_save (PeftModelForSequenceClassification, ...).
HEAD_MODULES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


class ModulesToSaveWrapper(nn.Module):
    """A module trained as a whole: the frozen original and a trainable copy (PEFT's wrapper)."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str = "default") -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({adapter_name: copy.deepcopy(module_to_save)})
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(True)

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs: the trained copy, or the original while adapters are disabled."""
        return self.original_module if self.disable_adapters else self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # transformers code reads attributes of its heads (``score.weight``, ``classifier.out_features``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)


def modules_to_save_for(task_type: str | None, modules_to_save: Iterable[str] | None) -> list[str] | None:
    """``modules_to_save`` with the task head PEFT adds for ``task_type`` (None when there is none)."""
    names = list(modules_to_save or [])
    for head in HEAD_MODULES.get(task_type or "", ()):
        if head not in names:
            names.append(head)
    return names or None


def find_modules_to_save(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The modules of ``model`` whose name ends with one of ``names`` (PEFT's matching), outermost only."""
    names = list(names)
    found: list[str] = []
    for key, _ in model.named_modules():
        if key and any(key.endswith(n) for n in names) and not any(key.startswith(f + ".") for f in found):
            found.append(key)
    return found


def wrap_modules_to_save(model: nn.Module, names: Iterable[str], adapter_name: str = "default") -> list[str]:
    """Wrap the modules of ``model`` that ``names`` match in :class:`ModulesToSaveWrapper`; returns their
    names. Already wrapped modules are left as they are."""
    found = find_modules_to_save(model, names)
    for key in found:
        module = model.get_submodule(key)
        if not isinstance(module, ModulesToSaveWrapper):
            replace_module(model, key, ModulesToSaveWrapper(module, adapter_name))
    return found


def saved_tensors(model: nn.Module, wrapped: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {param or buffer name: CPU tensor}}`` of each wrapper's trained copy (what PEFT saves)."""
    out = {}
    for key in wrapped:
        wrapper = model.get_submodule(key)
        state = wrapper.modules_to_save[wrapper.active_adapter].state_dict()
        out[key] = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in state.items()}
    return out


def check_saved_tensors(
    model: nn.Module, wrapped: Iterable[str], tensors: Mapping[str, Mapping[str, torch.Tensor]], source: str
) -> None:
    """``ValueError`` naming ``source`` and the module unless ``tensors`` holds exactly the state of each
    module ``wrapped`` names, with the model's shapes (checked before anything is loaded)."""
    wrapped = list(wrapped)
    extra = sorted(set(tensors) - set(wrapped))
    if extra:
        raise ValueError(f"{source}: tensors for {extra[0]!r}, which is not a module to save of this model")
    for key in wrapped:
        module = model.get_submodule(key)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        want = {k: tuple(t.shape) for k, t in module.state_dict().items()}
        got = {k: tuple(t.shape) for k, t in tensors.get(key, {}).items()}
        if want != got:
            missing = sorted(set(want) - set(got)) or sorted(k for k in want if want[k] != got.get(k))
            raise ValueError(
                f"{source}: module to save {key!r} does not match the model "
                f"(first difference: {(missing or sorted(set(got) - set(want)))[0]!r})"
            )


@torch.no_grad()
def load_saved_tensors(model: nn.Module, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Copy checked ``tensors`` (:func:`check_saved_tensors`) into the wrappers' trained copies."""
    for key, state in tensors.items():
        wrapper = model.get_submodule(key)
        wrapper.modules_to_save[wrapper.active_adapter].load_state_dict(dict(state), strict=True)


def bias_names(model: nn.Module, bias: str, adapted: Iterable[str], saved: Iterable[str]) -> dict[str, str]:
    """The biases PEFT trains and saves for ``bias`` ("all": every parameter whose name holds "bias";
    "lora_only": the adapted layers' own), as ``{name once adapted: name in model}`` (an adapted
    layer's bias moves under ``.base_layer``, as in PEFT's keys); modules to save keep theirs."""
    if bias == "none":
        return {}
    adapted, saved = set(adapted), list(saved)
    out = {}
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if "bias" not in name or any(module == m or module.startswith(m + ".") for m in saved):
            continue
        if module in adapted:
            out[f"{module}.base_layer.{leaf}"] = name
        elif bias == "all" and ".base_layer." not in name:
            out[name] = name
    return out


def check_saved_biases(
    model: nn.Module, biases: Mapping[str, str], tensors: Mapping[str, torch.Tensor], source: str
) -> None:
    """``ValueError`` naming ``source`` unless ``tensors`` holds every bias ``biases`` names (``{key:
    name in model}``, :func:`bias_names`) with the model's shape (checked before anything is loaded)."""
    for key, name in biases.items():
        want, got = tuple(model.get_parameter(name).shape), tensors.get(key)
        if got is None or tuple(got.shape) != want:
            found = "missing" if got is None else f"shape {tuple(got.shape)}"
            raise ValueError(f"{source}: trained bias {key!r} is {found}, the model needs {want}")
