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

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME, _atomic_write, kept_factors
from .reference import adapter_scale

if TYPE_CHECKING:
    from .model import AdaLoraModel


def _scale(layer) -> float:
    """The layer's AdaLoRA scale as the forward computes it (fp32 tensor arithmetic)."""
    ranknum = layer.ranknum.detach().to("cpu", torch.float32)
    return float(adapter_scale(layer.scaling, ranknum).reshape(()))


def export_lora(model: AdaLoraModel, path: str | os.PathLike) -> dict[str, int]:
    """Write ``model``'s adapter as a PEFT LoRA adapter (``adapter_config.json`` with peft_type LORA,
    ``adapter_model.safetensors``) into ``path``; returns ``{module: exported rank}``.

    Raises ``ValueError`` if every module has kept rank 0 (there is no update to export).
    """
    layers = dict(model.adapted_layers)
    factors = kept_factors(model)
    ranks = {name: t["lora_A"].shape[0] for name, t in factors.items() if t["lora_A"].shape[0] > 0}
    if not ranks:
        raise ValueError("export_lora: every adapted module has kept rank 0: there is no update to export")
    weights: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, k in ranks.items():
        t = factors[name]
        weights[f"{PREFIX}{name}.lora_A.weight"] = (t["lora_E"] * t["lora_A"]).contiguous()
        weights[f"{PREFIX}{name}.lora_B.weight"] = t["lora_B"].contiguous()
        alphas[name] = k * _scale(layers[name])
    adalora = model.adalora_config.to_peft_dict()
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
        "fan_in_fan_out": any(layers[n].fan_in_fan_out for n in ranks),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return ranks
