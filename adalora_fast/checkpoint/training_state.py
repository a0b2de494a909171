"""Our training-state file, ``adalora_training_state.safetensors``: what PEFT's format drops, so that
training resumes exactly. Plain data in and out; it never sees a model.

Tensors (format 1):

- ``<module>.lora_A | lora_E | lora_B``: the full factors as the layers hold them (unpruned under
  soft masking; compacted layers hold only their kept ranks);
- ``scores.<module>.<factor>.ema_ipt | ema_unc``: the importance EMAs (absent when there are none);
- ``keep.<module>``: the keep mask (uint8, one per held rank);
- ``allocator.nonfinite_steps``: int64 (1,), score steps skipped for inf/NaN gradients (optional:
  older files lack it).

Metadata (JSON): ``format``, ``modules``, the allocator's flags (``last_step``, ``budget``,
``masked``, ``finalized``, ``compacted``), ``compact_after_final``, ``loaded_patterns`` (each
module's held pattern) and ``weights_sha256``, the digest of the adapter weights file written with
it: a state whose digest does not match is ignored (with a warning), never applied to other weights.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..factors import FACTORS
from .files import file_digest, to_cpu
from .peft_format import BIN_WEIGHTS_NAME, WEIGHTS_NAME, weights_file
from .transaction import DirectoryWrite, finish_interrupted_save

STATE_NAME = "adalora_training_state.safetensors"
STATE_FORMAT = 1
NONFINITE_KEY = "allocator.nonfinite_steps"  # optional in format 1
_FLAGS = ("last_step", "budget", "masked", "finalized", "compacted")


@dataclass
class TrainingState:
    """A read training-state file: the raw tensors and metadata, with accessors."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def modules(self) -> list[str]:
        return list(self.meta.get("modules") or [])

    def factors(self, module: str) -> dict[str, torch.Tensor | None]:
        """The full factors saved for ``module`` (None where one is missing)."""
        return {k: self.tensors.get(f"{module}.{k}") for k in FACTORS}

    def held_pattern(self, module: str) -> list[bool] | None:
        return (self.meta.get("loaded_patterns") or {}).get(module)

    @property
    def compact_after_final(self) -> bool | None:
        return self.meta.get("compact_after_final")

    def allocator_state(self) -> dict[str, Any]:
        """The allocator's part, in :meth:`RankAllocator.state_dict`'s form."""
        t = self.tensors
        return {
            **{k: self.meta.get(k) for k in _FLAGS},
            "compacted": bool(self.meta.get("compacted", False)),
            "nonfinite_steps": t.get(NONFINITE_KEY),
            "keep": {k[len("keep.") :]: v.to(torch.bool) for k, v in t.items() if k.startswith("keep.")},
            "scores": {k[len("scores.") :]: v for k, v in t.items() if k.startswith("scores.")},
        }


def write_training_state(
    tx: DirectoryWrite,
    factors: Mapping[str, Mapping[str, torch.Tensor]],
    allocator_state: Mapping[str, Any],
    held_patterns: Mapping[str, list[bool] | None],
    compact_after_final: bool,
) -> None:
    """Stage ``adalora_training_state.safetensors`` in ``tx`` for the adapter weights staged (or already
    present) there: the full ``factors``, an allocator :meth:`state_dict` and each module's held
    pattern."""
    tensors = {f"{name}.{k}": to_cpu(t) for name, fs in factors.items() for k, t in fs.items()}
    for key, t in allocator_state["scores"].items():
        tensors[f"scores.{key}"] = to_cpu(t)
    for name, k in allocator_state["keep"].items():
        tensors[f"keep.{name}"] = to_cpu(k).to(torch.uint8)
    tensors[NONFINITE_KEY] = to_cpu(allocator_state["nonfinite_steps"]).reshape(1)
    meta = {
        "format": STATE_FORMAT,
        "modules": list(factors),
        **{k: allocator_state[k] for k in _FLAGS},
        "compact_after_final": compact_after_final,
        "loaded_patterns": dict(held_patterns),
        "weights_sha256": file_digest(_weights_in(tx)),
    }
    text = json.dumps(meta)  # fails before anything is written
    tx.stage(STATE_NAME, lambda tmp: save_file(tensors, tmp, metadata={"json": text}))


def _weights_in(tx: DirectoryWrite) -> Path:
    """The adapter weights file the transaction leaves (staged, or already in the folder)."""
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        if tx.exists(name):
            return tx.current(name)
    return tx.current(WEIGHTS_NAME)


def remove_training_state(tx: DirectoryWrite) -> None:
    """Delete the folder's training state at the commit (an inference model's save never leaves an
    older one behind)."""
    tx.remove(STATE_NAME)


def read_training_state(path: Path, stacklevel: int = 3) -> TrainingState | None:
    """The training state of checkpoint folder ``path``, or None when there is none or it belongs to
    other adapter weights than the folder's (then with a warning)."""
    finish_interrupted_save(path)
    state_path, weights_path = path / STATE_NAME, weights_file(path)
    if not state_path.is_file():
        return None
    try:
        with safe_open(str(state_path), framework="pt") as f:
            text = (f.metadata() or {}).get("json")
    except Exception as err:  # truncated or not a safetensors file
        raise ValueError(
            f"{state_path}: not a readable safetensors file ({type(err).__name__}: {err})"
        ) from None
    try:
        meta = json.loads(text) if text is not None else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{state_path}: its metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{state_path}: no training-state metadata (not written by adalora_fast?)")
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{state_path}: unknown training-state format {meta.get('format')!r}")
    _check_meta(meta, state_path)
    if not weights_path.is_file() or meta.get("weights_sha256") != file_digest(weights_path):
        warnings.warn(
            f"{state_path.name} was saved with other adapter weights than {weights_path.name} "
            "(the directory was written again by another tool, or a save was interrupted): "
            "ignoring the training state and loading the PEFT-format weights",
            stacklevel=stacklevel,
        )
        return None
    tensors = read_tensor_file(state_path)
    for key, t in tensors.items():
        integral = key.startswith("keep.") or key == NONFINITE_KEY
        if not integral and not t.is_floating_point():
            raise ValueError(
                f"{state_path}: tensor {key!r} has dtype {t.dtype}; adapter tensors are floating point"
            )
    return TrainingState(state_path, tensors, meta)


# The metadata keys and their types ("compacted" and "compact_after_final" are absent in older files).
_META = {
    "modules": (list,),
    "last_step": (int, type(None)),
    "budget": (int,),
    "masked": (bool,),
    "finalized": (bool,),
    "loaded_patterns": (dict,),
    "weights_sha256": (str,),
}
_OPTIONAL_META = {"compacted": (bool,), "compact_after_final": (bool, type(None))}


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """Every key the loader reads, of its type (an edited file is refused before anything changes)."""
    for key, types in {**_META, **_OPTIONAL_META}.items():
        if key not in meta:
            if key in _META:
                raise ValueError(f"{where}: its metadata lacks {key!r}")
            continue
        value = meta[key]
        wrong_int = int in types and bool not in types and isinstance(value, bool)
        if not isinstance(value, types) or wrong_int:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{where}: metadata {key!r} must be {names}, got {value!r}")
    if not all(isinstance(m, str) for m in meta["modules"]):
        raise ValueError(f"{where}: metadata 'modules' must list module names")
    if meta["last_step"] is not None and meta["last_step"] < 0 or meta["budget"] < 0:
        raise ValueError(f"{where}: metadata 'last_step' and 'budget' must be >= 0")


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with an error naming ``path`` for a truncated or foreign file."""
    try:
        return load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
