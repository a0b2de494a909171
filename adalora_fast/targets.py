"""Which modules of a model get adapted, what their sizes are, and how a module is swapped in place."""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

# PEFT 0.21's AdaLoRA defaults (``target_modules=None``), by ``model.config.model_type``.
PEFT_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear but the output head
# Ours: every attention and MLP projection of common architectures (heads left out), matched on the
# last name component.
ALL_PROJECTIONS = "all-projections"
PROJECTION_NAMES = frozenset(
    {
        # Llama / Mistral / Qwen / Gemma / Phi-3 style
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        # OPT / BART / Whisper style
        "out_proj", "fc1", "fc2",
        # GPT-2 / GPT-BigCode (Conv1D)
        "c_attn", "c_proj", "c_fc",
        # BERT / RoBERTa
        "query", "key", "value", "dense",
        # DeBERTa-v2
        "query_proj", "key_proj", "value_proj",
        # T5
        "q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1",
        # GPT-NeoX / Falcon / Bloom
        "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
    }
)  # fmt: skip
HEAD_PARTS = frozenset({"lm_head", "pooler", "classifier", "score", "qa_outputs"})
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # what PEFT's "all-linear" leaves out of SEQ_CLS models

SUPPORTED = (nn.Linear, Conv1D)


def base_features(base: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a supported base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, Conv1D):  # GPT-2 style: weight stored as (d_in, d_out)
        d_in, d_out = base.weight.shape
        return d_in, d_out, True
    raise TypeError(
        f"unsupported base layer {type(base).__name__}: AdaLoRA adapts nn.Linear (bitsandbytes' Linear4bit "
        "and Linear8bitLt, and linears with torchao NF4 weights, included) and Conv1D; GPTQ / AWQ quantised "
        "layers are not supported"
    )


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index in a module name, as PEFT finds it: the first number after ``layers_pattern``
    (any name component when it is empty)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def _head_names(model: nn.Module, task_type: str | None) -> set[str]:
    """The output head PEFT's ``"all-linear"`` leaves out: the output embeddings, else for SEQ_CLS the
    ``score`` / ``classifier`` module."""
    heads = []
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.append(output)
    elif task_type == "SEQ_CLS":
        heads += [
            getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)
        ][:1]
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's AdaLoRA default targets for ``model`` (by ``config.model_type``), or a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PEFT_DEFAULT_TARGETS:
        raise ValueError(
            f"target_modules=None: PEFT has no default target modules for model_type {model_type!r}; "
            f"name them (target_modules=[...]), or pass {ALL_LINEAR!r} or {ALL_PROJECTIONS!r}"
        )
    default = PEFT_DEFAULT_TARGETS[model_type]
    return list(default) if isinstance(default, list) else default


def find_target_modules(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: list[str] | str | None = None,
    task_type: str | None = None,
    modules_to_save: list[str] | None = None,
) -> list[str]:
    """Names of the modules to adapt, in ``named_modules`` order, chosen as PEFT chooses them.

    A list matches module-name suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``),
    a string is a regular expression that must match the whole name; ``None`` is PEFT's default for
    the model type (:data:`PEFT_DEFAULT_TARGETS`); ``"all-linear"`` every linear but the output head
    (PEFT's shorthand); ``"all-projections"`` every attention and MLP projection (ours).
    ``layers_to_transform`` keeps only modules of those layer indices (found after ``layers_pattern``),
    for list specs, as in PEFT. Modules inside a module to save are never adapted (PEFT's rule).
    """
    spec = default_target_modules(model) if target_modules is None else target_modules
    shorthand = (
        spec.lower() if isinstance(spec, str) and spec.lower() in (ALL_LINEAR, ALL_PROJECTIONS) else None
    )
    heads = _head_names(model, task_type) if shorthand == ALL_LINEAR else set()
    indices = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if not isinstance(module, SUPPORTED):
            named = _named_target(name, module, spec, indices, layers_pattern, exclude_modules)
            if shorthand is None and named:
                # PEFT refuses a named target it cannot adapt; skipping it would train less than asked.
                try:
                    base_features(module)
                except TypeError as err:
                    raise ValueError(f"target module {name!r}: {err}") from None
            continue
        if shorthand == ALL_PROJECTIONS:
            parts = name.split(".")
            if parts[-1] not in PROJECTION_NAMES or HEAD_PARTS.intersection(parts):
                continue
        elif shorthand == ALL_LINEAR:
            if name in heads:
                continue
        elif not _matches(name, spec):
            continue
        if indices and not isinstance(spec, str) and _layer_index(name, layers_pattern) not in indices:
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
            continue
        names.append(name)
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}"
            + (f", layers_to_transform={layers_to_transform!r}" if layers_to_transform is not None else "")
            + f") matches no nn.Linear or Conv1D module of {type(model).__name__}"
        )
    return names


def _named_target(name, module, spec, indices, layers_pattern, exclude_modules) -> bool:
    """Whether a list / regex ``spec`` names this leaf module (and no filter drops it)."""
    if any(True for _ in module.children()) or not _matches(name, spec):
        return False  # containers are never targets (a regex may span them)
    if indices and not isinstance(spec, str) and _layer_index(name, layers_pattern) not in indices:
        return False
    return exclude_modules is None or not _matches(name, exclude_modules)


def config_targets(model: nn.Module, config: Any) -> list[str]:
    """:func:`find_target_modules` with an :class:`~adalora_fast.AdaLoraConfig`'s fields."""
    return find_target_modules(
        model,
        config.target_modules,
        config.exclude_modules,
        config.layers_to_transform,
        config.layers_pattern,
        config.task_type,
        config.modules_to_save,
    )


def resolved_target_modules(model: nn.Module, target_modules: Any, adapted_names: list[str]) -> Any:
    """What ``target_modules`` becomes once applied to ``model``, as PEFT records it in the config:
    PEFT's default list for ``None``, the adapted names for a shorthand, else the spec itself."""
    if target_modules is None:
        return default_target_modules(model)
    if isinstance(target_modules, str) and target_modules.lower() in (ALL_LINEAR, ALL_PROJECTIONS):
        return sorted(adapted_names)
    return target_modules


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """Where PEFT's layer replication finds the decoder/encoder layers: ``(owner, attribute)`` of a
    ``ModuleList`` at ``model[.model]*.layers`` (Llama), ``[.bert].encoder.layer`` (BERT) or ``.h``."""
    while hasattr(model, "model") and isinstance(model.model, nn.Module):
        model = model.model
    if hasattr(model, "bert"):
        model = model.bert
    for owner, attr in ((model, "layers"), (getattr(model, "encoder", None), "layer"), (model, "h")):
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise ValueError(
        f"layer_replication: no layer list in {type(model).__name__} (Llama-, BERT- or Falcon-style "
        "architectures only, as in PEFT)"
    )


def replicate_layers(model: nn.Module, layer_map: list[tuple[int, int]]) -> Any:
    """PEFT's ``layer_replication``: the layer list becomes the ranges ``[start, end)`` of ``layer_map``
    one after the other, each entry a clone sharing its parameters with the original layer (so each
    gets its own adapters). Returns a function that restores the original list."""
    owner, attr = _layer_list(model)
    layers = getattr(owner, attr)
    config = getattr(owner, "config", None) or getattr(model, "config", None)
    before = getattr(config, "num_hidden_layers", None)
    new: list[nn.Module] = []
    for start, end in layer_map:
        if not 0 <= start < end <= len(layers):
            raise ValueError(f"layer_replication: range [{start}, {end}) is outside the {len(layers)} layers")
        for i in range(start, end):
            clone = copy.deepcopy(layers[i])
            for name, sub in layers[i].named_modules():
                for pname, param in sub.named_parameters(recurse=False):
                    clone.get_submodule(name).register_parameter(pname, param)  # shared weights
            for sub in clone.modules():  # transformers' per-layer cache index
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(clone)
    setattr(owner, attr, nn.ModuleList(new))
    if before is not None:
        config.num_hidden_layers = len(new)

    def undo() -> None:
        setattr(owner, attr, layers)
        if before is not None:
            config.num_hidden_layers = before

    return undo
