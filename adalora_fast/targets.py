"""Which modules of a model get adapted, what their sizes are, and how a module is swapped in place."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

# Attention and MLP projections of common architectures, matched on the last name component.
DEFAULT_TARGET_NAMES = frozenset(
    {
        # Llama / Mistral / Qwen / Gemma / Phi-3 style
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        # OPT / BART / Whisper style
        "out_proj", "fc1", "fc2",
        # GPT-2 / GPT-BigCode (Conv1D)
        "c_attn", "c_proj", "c_fc",
        # BERT / RoBERTa
        "query", "key", "value", "dense",
        # T5
        "q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1",
        # GPT-NeoX / Falcon / Bloom
        "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
    }
)  # fmt: skip
# Heads are never adapted by default (PEFT leaves them alone too).
DEFAULT_EXCLUDED_PARTS = frozenset({"lm_head", "pooler", "classifier", "score", "qa_outputs"})

SUPPORTED = (nn.Linear, Conv1D)


def base_features(base: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a supported base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, Conv1D):  # GPT-2 style: weight stored as (d_in, d_out)
        d_in, d_out = base.weight.shape
        return d_in, d_out, True
    raise TypeError(f"unsupported base layer {type(base).__name__}: AdaLoRA adapts nn.Linear and Conv1D")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def find_target_modules(
    model: nn.Module, target_modules: list[str] | str | None, exclude_modules: list[str] | str | None
) -> list[str]:
    """Names of the modules to adapt, in ``named_modules`` order.

    A list matches module-name suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``),
    a string is a regular expression that must match the whole name. ``None`` picks the attention
    and MLP linears of common architectures.
    """
    names = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, SUPPORTED):
            continue
        if target_modules is None:
            parts = name.split(".")
            if parts[-1] not in DEFAULT_TARGET_NAMES or DEFAULT_EXCLUDED_PARTS.intersection(parts):
                continue
        elif not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        names.append(name)
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no nn.Linear "
            f"or Conv1D module of {type(model).__name__}"
        )
    return names
