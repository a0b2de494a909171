"""PEFT's AdaLoRA adapter files <-> plain dicts (``docs/numeric_contract.md`` §2 item 9).

- ``adapter_config.json``: PEFT's ``AdaLoraConfig`` fields; ``rank_pattern`` as
  ``{"<module>.lora_E": [bool] * init_r}``.
- ``adapter_model.safetensors`` (or PEFT's legacy ``adapter_model.bin``, read with
  ``torch.load(weights_only=True)``): ``base_model.model.<module>.lora_A | lora_E | lora_B``, pruned to
  the kept ranks (a module may have rank 0).
- ``README.md``: a model card as PEFT writes one (front matter naming the base model), when absent.

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
from .transaction import DirectoryWrite

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's safe_serialization=False (and older PEFT versions)
MODEL_CARD_NAME = "README.md"
# transformers' pipeline tag per PEFT task type, for the model card.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
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
    cfg["inference_mode"] = True  # as PEFT writes it: a saved adapter loads for inference by default
    return cfg


def weights_file(path: Path) -> Path:
    """The adapter weights file of the folder ``path``: ``adapter_model.safetensors``, else PEFT's legacy
    ``adapter_model.bin`` (PEFT's preference too); the safetensors path when there is neither."""
    safe = path / WEIGHTS_NAME
    return path / BIN_WEIGHTS_NAME if not safe.is_file() and (path / BIN_WEIGHTS_NAME).is_file() else safe


def write_adapter(
    tx: DirectoryWrite, config: Mapping[str, Any], factors: Factors, safe_serialization: bool = True
) -> None:
    """Stage the weights (``factors``: CPU tensors, kept ranks) and the config in ``tx``; the weights
    file of the other format, if any, goes at the commit (PEFT would read a stale ``.safetensors``
    before a new ``.bin``)."""
    weights = {f"{PREFIX}{name}.{k}": t for name, tensors in factors.items() for k, t in tensors.items()}
    text = json.dumps(dict(config), indent=2, sort_keys=True)  # fails before anything is written
    if safe_serialization:
        tx.stage(WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        tx.remove(BIN_WEIGHTS_NAME)
    else:
        tx.stage(BIN_WEIGHTS_NAME, lambda tmp: torch.save(weights, tmp))
        tx.remove(WEIGHTS_NAME)
    tx.stage(CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def write_model_card(tx: DirectoryWrite, base_model: str | None, task_type: str | None) -> None:
    """Stage PEFT's model-card front matter as ``README.md``, unless the folder already has a README."""
    if tx.exists(MODEL_CARD_NAME):
        return
    lines = ["---", f"base_model: {json.dumps(base_model or '')}", "library_name: peft"]
    if task_type in PIPELINE_TAGS:
        lines.append(f"pipeline_tag: {PIPELINE_TAGS[task_type]}")
    tags = [f"base_model:adapter:{base_model or ''}", "adalora", "adalora_fast", "transformers"]
    lines += ["tags:", *(f"- {json.dumps(t)}" for t in tags), "---", ""]
    body = (
        "# AdaLoRA adapter\n\nAn AdaLoRA adapter in PEFT's format, trained with adalora_fast. Load it with "
        "`peft.PeftModel.from_pretrained(base, path)` or\n"
        "`adalora_fast.AdaLoraModel.from_pretrained(base, path)`.\n"
    )
    text = "\n".join(lines) + "\n" + body
    tx.stage(MODEL_CARD_NAME, lambda tmp: Path(tmp).write_text(text))


def read_config(path: Path) -> AdaLoraConfig:
    """The :class:`AdaLoraConfig` of the checkpoint folder ``path``."""
    return AdaLoraConfig.from_pretrained(path)


def read_weights(path: Path) -> tuple[Factors, dict[str, torch.Tensor]]:
    """The folder's weights file (:func:`weights_file`) as ``({module: {factor: tensor}}, others)``:
    the AdaLoRA factors, and every other tensor (``modules_to_save`` state: ``{"<module>.<name>": t}``)
    for the caller to match. ``ValueError`` naming the file for a key outside ``base_model.model.``
    (factors may be missing: the caller checks)."""
    weights_path = weights_file(path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (nor {BIN_WEIGHTS_NAME}) in {path}")
    if weights_path.suffix == ".bin":
        try:
            loaded = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or a corrupt file: name the file
            reason = f"{type(err).__name__}: {err}"
            raise ValueError(f"{weights_path}: not a readable tensor file ({reason})") from None
        if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
            raise ValueError(f"{weights_path}: not a dict of tensors")
    else:
        try:
            loaded = load_file(str(weights_path))
        except Exception as err:  # truncated or not a safetensors file: name the file
            reason = f"{type(err).__name__}: {err}"
            raise ValueError(f"{weights_path}: not a readable safetensors file ({reason})") from None
    factors: Factors = {}
    others: dict[str, torch.Tensor] = {}
    for key, t in loaded.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights_path}: unexpected key {key!r} (not an AdaLoRA adapter tensor)")
        module, _, kind = key[len(PREFIX) :].rpartition(".")
        if kind in FACTORS and not t.is_floating_point():
            raise ValueError(
                f"{weights_path}: {key!r} has dtype {t.dtype}; adapter factors are floating point"
            )
        if kind in FACTORS:
            factors.setdefault(module, {})[kind] = t
        else:
            others[key[len(PREFIX) :]] = t
    return factors, others
