"""PEFT's AdaLoRA adapter files <-> plain dicts (``docs/numeric_contract.md`` §2 item 9).

- ``adapter_config.json``: PEFT's ``AdaLoraConfig`` fields; ``rank_pattern`` as
  ``{"<module>.lora_E": [bool] * init_r}``.
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A | lora_E | lora_B``, pruned to
  the kept ranks (a module may have rank 0).

The functions here read and write those files from and to ``{module: {factor: tensor}}`` dicts and
:class:`~adalora_fast.AdaLoraConfig`; they never see a model (the model supplies and receives the
dicts). :func:`parse_rank_pattern` is the one reader of PEFT's rank-pattern keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import AdaLoraConfig
from ..factors import FACTORS
from .files import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

Factors = dict[str, dict[str, torch.Tensor]]  # {module: {"lora_A" | "lora_E" | "lora_B": tensor}}


def parse_rank_pattern(
    rank_pattern: Mapping[str, Any] | None, adapter: str | None = None, source: str = "rank_pattern"
) -> dict[str, list[bool]] | None:
    """PEFT's ``rank_pattern`` as ``{module: [bool] * init_r}`` (None stays None).

    PEFT's keys are ``<module>.lora_E``, or ``<module>.lora_E.<adapter>`` in its in-memory config
    (``adapter`` names it; when None any suffix after ``.lora_E`` is dropped); values are lists of
    bools or tensors. ``ValueError`` naming ``source`` for a key that does not name a ``lora_E``."""
    if rank_pattern is None:
        return None
    out: dict[str, list[bool]] = {}
    for key, keep in rank_pattern.items():
        name = key
        if adapter is not None and name.endswith(f".{adapter}"):
            name = name[: -len(f".{adapter}")]
        elif adapter is None and ".lora_E." in name and not name.endswith(".lora_E"):
            name = name.rsplit(".", 1)[0]
        if not name.endswith(".lora_E"):
            raise ValueError(f"{source}: rank_pattern key {key!r} does not name a lora_E")
        values = keep.reshape(-1).tolist() if isinstance(keep, torch.Tensor) else keep
        out[name[: -len(".lora_E")]] = [bool(v) for v in values]
    return out


def config_dict(
    config: AdaLoraConfig,
    rank_pattern: Mapping[str, list[bool]] | None,
    target_modules: list[str] | str,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """The ``adapter_config.json`` content: ``config``'s PEFT fields with the model's rank pattern
    (``{module: bools}``), the modules it adapts and whether its weights are stored (d_in, d_out)."""
    cfg = config.to_peft_dict()
    cfg["rank_pattern"] = (
        None if rank_pattern is None else {f"{n}.lora_E": list(p) for n, p in rank_pattern.items()}
    )
    cfg["target_modules"] = target_modules
    # PEFT reads Conv1D (GPT-2) weights transposed only with this flag (else it warns and sets it).
    cfg["fan_in_fan_out"] = fan_in_fan_out
    return cfg


def write_adapter(path: Path, config: Mapping[str, Any], factors: Factors) -> None:
    """Write the weights (``factors``: CPU tensors, kept ranks) and then the config into ``path``,
    each file atomically."""
    weights = {f"{PREFIX}{name}.{k}": t for name, tensors in factors.items() for k, t in tensors.items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def read_config(path: Path) -> AdaLoraConfig:
    """The :class:`AdaLoraConfig` of the checkpoint folder ``path``."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a PEFT/adalora_fast adapter checkpoint")
    return AdaLoraConfig.from_peft_dict(json.loads(cfg_path.read_text()))


def read_weights(path: Path) -> Factors:
    """``{module: {factor: tensor}}`` of ``path/adapter_model.safetensors``; ``ValueError`` naming the
    file for a key that is not an AdaLoRA adapter tensor (factors may be missing: the caller checks)."""
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    out: Factors = {}
    for key, t in load_file(str(weights_path)).items():
        module, _, kind = key[len(PREFIX) :].rpartition(".")
        if not key.startswith(PREFIX) or kind not in FACTORS:
            raise ValueError(f"{weights_path}: unexpected key {key!r} (not an AdaLoRA adapter tensor)")
        out.setdefault(module, {})[kind] = t
    return out
