"""A trained AdaLoRA adapter as a standard PEFT **LoRA** adapter, for tools that serve only LoRA.

AdaLoRA's update of a layer is ``B diag(λ) A * s`` with ``s = lora_alpha / (ranknum + 1e-5)``; a LoRA
adapter's is ``B' A' * alpha' / r'``. Per adapted module, over the kept ranks only:

- ``lora_A.weight = diag(λ) A`` (kept rows), ``lora_B.weight = B`` (kept columns), ``r' = k`` (the
  kept rank, through ``rank_pattern``),
- ``alpha' = k * s`` (through ``alpha_pattern``), so that ``alpha' / r'`` is AdaLoRA's scale,

and modules whose kept rank is 0 are left out of ``target_modules``. The total exported rank equals
the kept budget; ``peft.PeftModel.from_pretrained(base, path)`` loads the result as a LoRA model with
AdaLoRA's outputs (to fp32 rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import AdaLoraConfig
from .peft_format import BIN_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME, write_adapter
from .transaction import DirectoryWrite


def lora_weights(factors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"lora_A.weight": diag(λ) A, "lora_B.weight": B}}`` for the modules of non-zero kept
    rank (``factors``: the kept ranks of each module)."""
    return {
        name: {
            "lora_A.weight": (t["lora_E"] * t["lora_A"]).contiguous(),
            "lora_B.weight": t["lora_B"].contiguous(),
        }
        for name, t in factors.items()
        if t["lora_A"].shape[0] > 0
    }


def write_lora_adapter(
    path: Path,
    factors: Mapping[str, Mapping[str, torch.Tensor]],
    scales: Mapping[str, float],
    fan_in_fan_out: Mapping[str, bool],
    adalora_config: AdaLoraConfig,
    saved_modules: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, int]:
    """Write the LoRA adapter (``adapter_config.json`` with peft_type LORA, ``adapter_model.safetensors``)
    of the kept ``factors`` (``{module: {factor: CPU tensor}}``) with AdaLoRA scales ``scales``
    (``{module: s}``) into ``path``; returns ``{module: exported rank}``. ``saved_modules``
    (``{module: state}``: trained task heads) are written as the LoRA adapter's ``modules_to_save``.

    Raises ``ValueError`` if every module has kept rank 0 (there is no update to export).
    """
    weights = lora_weights(factors)
    if not weights:
        raise ValueError("export_lora: every adapted module has kept rank 0: there is no update to export")
    ranks = {name: t["lora_A.weight"].shape[0] for name, t in weights.items()}
    alphas = {name: k * scales[name] for name, k in ranks.items()}
    adalora = adalora_config.to_peft_dict()
    first = next(iter(ranks))
    config = {
        "peft_type": "LORA",
        "task_type": adalora.get("task_type"),
        "base_model_name_or_path": adalora.get("base_model_name_or_path"),
        "revision": adalora.get("revision"),
        "r": ranks[first],
        "lora_alpha": alphas[first],
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "target_modules": sorted(ranks),
        "lora_dropout": adalora.get("lora_dropout", 0.0),
        "fan_in_fan_out": any(fan_in_fan_out[n] for n in ranks),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(saved_modules) if saved_modules else None,
    }
    with DirectoryWrite(path, (CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME)) as tx:
        write_adapter(tx, config, {**weights, **(saved_modules or {})})
        tx.commit()
    return ranks
