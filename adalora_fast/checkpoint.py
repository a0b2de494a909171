"""Checkpoints in PEFT's AdaLoRA format, plus a training-state file so that training resumes exactly.

Files in a checkpoint directory:

* ``adapter_config.json``: PEFT's AdaLoraConfig fields, ``rank_pattern`` as ``{module.lora_E: [bool]}``.
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A|lora_E|lora_B``, pruned to the
  kept ranks (PEFT loads this directory as is).
* ``adalora_training_state.safetensors``: what the PEFT format drops: the full (unpruned) A, E, B
  (as the layers hold them: compacted layers hold only their kept ranks), the score EMAs, the keep
  masks, the count of score steps skipped for non-finite gradients, and the allocator's step and
  flags and ``compact_after_final`` (metadata). Only trainable models write it;
  ``from_pretrained(..., is_trainable=True)`` uses it to resume (also a compacted model).

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdaLoraConfig
from .layer import base_features
from .targets import find_target_modules

if TYPE_CHECKING:
    from .model import AdaLoraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STATE_NAME = "adalora_training_state.safetensors"
PREFIX = "base_model.model."
STATE_FORMAT = 1
# Optional keys of format 1 (older files lack them and still load):
NONFINITE_KEY = "allocator.nonfinite_steps"  # int64 (1,): score steps skipped for inf/NaN gradients


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_digest(path: Path) -> str:
    """SHA-256 of a file: ties the training state to the adapter weights it was saved with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


FACTORS = ("lora_A", "lora_E", "lora_B")


def kept_factors(
    model: AdaLoraModel, keep: dict[str, torch.Tensor] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"lora_A": (k, d_in), "lora_E": (k, 1), "lora_B": (d_out, k)}}``: CPU copies of the
    kept ranks of every adapted layer (what a PEFT checkpoint holds; k may be 0). ``keep`` defaults to
    the allocator's masks once it has masked; without masks every rank the layer holds is kept."""
    if keep is None:
        alloc = model.rank_allocator
        keep = alloc.keep_mask() if alloc is not None and alloc.masked else {}
    out = {}
    for name, layer in model.adapted_layers:
        tensors = {k: _cpu(getattr(layer, k)) for k in FACTORS}
        if name in keep:
            idx = keep[name].to("cpu", torch.bool)
            tensors = {"lora_A": tensors["lora_A"][idx], "lora_E": tensors["lora_E"][idx],
                       "lora_B": tensors["lora_B"][:, idx]}  # fmt: skip
        out[name] = {k: t.contiguous() for k, t in tensors.items()}
    return out


def save_pretrained(model: AdaLoraModel, path: str | os.PathLike) -> None:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    alloc = model.rank_allocator
    masked = alloc is not None and alloc.masked
    keep = alloc.keep_mask() if masked else {}
    layers = model.adapted_layers
    pruned_layers = any(layer.r != layer.init_r for _, layer in layers)

    full = {f"{name}.{k}": _cpu(getattr(layer, k)) for name, layer in layers for k in FACTORS}
    rank_pattern = model.rank_pattern if (masked or pruned_layers) else None
    kept = kept_factors(model, keep)
    weights = {f"{PREFIX}{name}.{k}": t for name, tensors in kept.items() for k, t in tensors.items()}

    if model.adalora_config.total_step is None:
        warnings.warn(
            "saving with total_step=None: PEFT refuses to load such a checkpoint; set total_step first "
            "(model.set_total_step(n)) if PEFT must read it",
            stacklevel=3,
        )
    cfg = model.adalora_config.to_peft_dict()
    cfg["rank_pattern"] = (
        None if rank_pattern is None else {f"{n}.lora_E": p for n, p in rank_pattern.items()}
    )
    cfg["target_modules"] = model.adalora_config.target_modules
    # PEFT reads Conv1D (GPT-2) weights transposed only with this flag (else it warns and sets it).
    cfg["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    if cfg["target_modules"] is None:  # record what the defaults picked, so that PEFT finds the same modules
        cfg["target_modules"] = sorted(model.adapted_names)
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    _atomic_write(
        out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    )

    if alloc is None:
        # An inference model has no training state; never leave an older one next to new weights.
        (out / STATE_NAME).unlink(missing_ok=True)
        return
    state = dict(full)
    for key, t in alloc.scorer.layer_state().items():
        state[f"scores.{key}"] = _cpu(t)
    for name, k in alloc.keep_mask().items():
        state[f"keep.{name}"] = _cpu(k).to(torch.uint8)
    state[NONFINITE_KEY] = _cpu(alloc.nonfinite_steps).reshape(1)
    meta = {
        "format": STATE_FORMAT,
        "modules": model.adapted_names,
        "last_step": alloc.last_step,
        "budget": alloc.budget,
        "masked": alloc.masked,
        "finalized": alloc.finalized,
        "compacted": alloc.compacted,
        "compact_after_final": model.adalora_config.compact_after_final,
        "loaded_patterns": {n: getattr(layer, "loaded_pattern", None) for n, layer in layers},
        "weights_sha256": _file_digest(out / WEIGHTS_NAME),
    }
    _atomic_write(out / STATE_NAME, lambda tmp: save_file(state, tmp, metadata={"json": json.dumps(meta)}))


def _read_config(path: Path) -> AdaLoraConfig:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a PEFT/adalora_fast adapter checkpoint")
    raw = json.loads(cfg_path.read_text())
    return AdaLoraConfig.from_peft_dict(raw)


def _module_names_in(weights: dict[str, torch.Tensor], path: Path) -> set[str]:
    names = set()
    for key in weights:
        if not key.startswith(PREFIX) or key.rsplit(".", 1)[-1] not in ("lora_A", "lora_E", "lora_B"):
            raise ValueError(f"{path / WEIGHTS_NAME}: unexpected key {key!r} (not an AdaLoRA adapter tensor)")
        names.add(key[len(PREFIX) :].rsplit(".", 1)[0])
    return names


def _check_layer(name: str, base: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> int:
    try:
        d_in, d_out, _ = base_features(base)
    except TypeError as err:
        raise ValueError(f"{source}: module {name!r} of the model is {type(base).__name__}: {err}") from None
    for k in ("lora_A", "lora_E", "lora_B"):
        if k not in tensors:
            raise ValueError(f"{source}: module {name!r} has no {k}")
    r = tensors["lora_A"].shape[0]
    want = {"lora_A": (r, d_in), "lora_E": (r, 1), "lora_B": (d_out, r)}
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(
                f"{source}: module {name!r}: {k} has shape {tuple(tensors[k].shape)}, "
                f"the model needs {shape} "
                f"(d_in={d_in}, d_out={d_out}, r={r})"
            )
    return r


def _check_state(
    name: str, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path
) -> None:
    """The keep mask and score EMAs of one module match its weights (before anything is loaded)."""
    r = tensors["lora_A"].shape[0]
    keep = state.get(f"keep.{name}")
    if keep is None or tuple(keep.shape) != (r,):
        got = None if keep is None else tuple(keep.shape)
        raise ValueError(f"{path}: keep mask of module {name!r} has shape {got}, expected ({r},)")
    has_scores = any(k.startswith("scores.") for k in state)
    if not has_scores:
        return
    for kind, t in tensors.items():
        for tag in ("ema_ipt", "ema_unc"):
            ema = state.get(f"scores.{name}.{kind}.{tag}")
            if ema is None or ema.shape != t.shape:
                got = None if ema is None else tuple(ema.shape)
                raise ValueError(
                    f"{path}: score EMA {tag} of {name}.{kind} has shape {got}, expected {tuple(t.shape)}"
                )


def load_pretrained(
    cls: type[AdaLoraModel],
    model: nn.Module,
    path: str | os.PathLike,
    is_trainable: bool = False,
    backend: str | None = None,
) -> AdaLoraModel:
    """Load a checkpoint written by adalora_fast or by PEFT's AdaLoRA onto ``model``.

    Everything is checked against the model before the model is touched: nothing is half-loaded.
    """
    root = Path(path)
    config = _read_config(root)
    if backend is not None:
        config.backend = backend
    weights_path = root / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {root}")
    weights = load_file(str(weights_path))
    state_path = root / STATE_NAME
    read = _read_state(root, stacklevel=4) if is_trainable else None
    use_state = read is not None
    meta: dict[str, Any] = {}
    if read is not None:
        state, meta = read
        # Our own config field, kept out of PEFT's adapter_config.json (absent in older files).
        config.compact_after_final = bool(meta.get("compact_after_final", config.compact_after_final))

    targets = find_target_modules(model, config.target_modules, config.exclude_modules)
    in_ckpt = _module_names_in(weights, root)
    missing = sorted(set(targets) - in_ckpt)
    extra = sorted(in_ckpt - set(targets))
    if extra:
        raise ValueError(f"{weights_path}: module {extra[0]!r} is not an adapted module of this model")
    if missing:
        raise ValueError(f"{weights_path}: no weights for module {missing[0]!r} of this model")

    # PEFT may keep the adapter name in the keys ("<module>.lora_E.default").
    pattern_cfg = {
        (k.rsplit(".", 1)[0] if not k.endswith(".lora_E") and ".lora_E." in k else k): v
        for k, v in (config.rank_pattern or {}).items()
    }
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    patterns: dict[str, list[bool] | None] = {}
    for name in targets:
        base = model.get_submodule(name)
        if use_state:
            tensors = {k: state.get(f"{name}.{k}") for k in ("lora_A", "lora_E", "lora_B")}
            if any(t is None for t in tensors.values()):
                raise ValueError(f"{state_path}: no full weights for module {name!r}")
            r = _check_layer(name, base, tensors, str(state_path))
            _check_state(name, tensors, state, state_path)
            patterns[name] = (meta.get("loaded_patterns") or {}).get(name)
        else:
            tensors = {k: weights[f"{PREFIX}{name}.{k}"] for k in ("lora_A", "lora_E", "lora_B")}
            r = _check_layer(name, base, tensors, str(weights_path))
            pattern = pattern_cfg.get(f"{name}.lora_E")
            if pattern is not None and (len(pattern) != config.init_r or sum(pattern) != r):
                raise ValueError(
                    f"{root / CONFIG_NAME}: rank_pattern of {name!r} keeps {sum(pattern)} of {len(pattern)} "
                    f"ranks but the weights have rank {r} (init_r={config.init_r})"
                )
            if pattern is None and r != config.init_r:
                raise ValueError(f"{weights_path}: module {name!r} has rank {r}, init_r is {config.init_r}")
            patterns[name] = pattern if pattern is not None and r != config.init_r else None
        if r != config.init_r and patterns[name] is None:
            raise ValueError(f"{state_path}: module {name!r} has rank {r} but no recorded pattern")
        per_layer[name] = tensors

    wrapped = cls(model, config, is_trainable=False)
    for name, layer in wrapped.adapted_layers:
        tensors = per_layer[name]
        r = tensors["lora_A"].shape[0]
        if r != layer.r:
            layer.resize(r)
            layer.loaded_pattern = patterns[name]
        with torch.no_grad():
            for k, t in tensors.items():
                getattr(layer, k).copy_(t)
    wrapped.is_trainable = is_trainable
    if not is_trainable:
        wrapped.requires_grad_(False)
        wrapped.eval()
        return wrapped
    for _, layer in wrapped.adapted_layers:
        for k in ("lora_A", "lora_E", "lora_B"):
            getattr(layer, k).requires_grad_(True)
    wrapped.build_allocator()
    alloc = wrapped.rank_allocator
    if use_state:
        _apply_state(alloc, state, meta, targets)
    return wrapped


def _read_state(root: Path, stacklevel: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The training state of checkpoint ``root`` (tensors, metadata), or None when there is none or it
    belongs to other adapter weights than the directory's (then with a warning)."""
    from safetensors import safe_open

    state_path, weights_path = root / STATE_NAME, root / WEIGHTS_NAME
    if not state_path.is_file():
        return None
    with safe_open(str(state_path), framework="pt") as f:
        meta = json.loads(f.metadata()["json"])
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{state_path}: unknown training-state format {meta.get('format')!r}")
    if not weights_path.is_file() or meta.get("weights_sha256") != _file_digest(weights_path):
        warnings.warn(
            f"{state_path.name} was saved with other adapter weights than {weights_path.name} "
            "(the directory was written again by another tool, or a save was interrupted): "
            "ignoring the training state and loading the PEFT-format weights",
            stacklevel=stacklevel,
        )
        return None
    return load_file(str(state_path)), meta


def _apply_state(alloc: Any, state: dict[str, torch.Tensor], meta: dict[str, Any], names: list[str]) -> None:
    """Scores, keep masks, counters and flags of a checked training state into ``alloc``."""
    if meta.get("compacted", False):
        alloc.mark_compacted()  # the layers hold the compacted ranks
    scores = {k[len("scores.") :]: v for k, v in state.items() if k.startswith("scores.")}
    alloc.scorer.load_layer_state(scores)
    alloc.scorer.set_keep({n: state[f"keep.{n}"] for n in names})
    alloc.last_step = meta["last_step"]
    alloc.budget = meta["budget"]
    alloc.masked = meta["masked"]
    alloc.finalized = meta["finalized"]
    if NONFINITE_KEY in state:
        alloc.nonfinite_steps = state[NONFINITE_KEY]


def load_training_state(
    model: AdaLoraModel, path: str | os.PathLike, only_if_weights_match: bool = False
) -> bool:
    """Restore a trainable ``model`` in place from our checkpoint ``path`` (written by
    ``save_pretrained`` of a model with the same adapted modules): A, E, B (copied into the same
    parameters, so optimizers keep them), importance EMAs, keep masks and allocator flags. This is how
    a trainer that restores the rest (optimizer, RNG, step) itself resumes exactly. Returns False,
    changing nothing, when ``path`` holds no training state, or (``only_if_weights_match``) when its
    A, E, B are not bitwise the model's: a trainer that restored the weights itself thereby makes sure
    the state belongs to them. Raises ``ValueError`` (nothing changed) when the state does not fit the
    model."""
    root = Path(path)
    alloc = model.rank_allocator
    if alloc is None:
        raise RuntimeError("load_training_state: the model was loaded for inference (is_trainable=False)")
    read = _read_state(root)
    if read is None:
        return False
    state, meta = read
    names = list(model.adapted_names)
    saved = meta.get("modules")
    if saved != names:
        extra = sorted(set(saved or []) - set(names)) or sorted(set(names) - set(saved or []))
        raise ValueError(
            f"{root / STATE_NAME}: saved for other adapted modules than this model's "
            f"(first difference: {extra[0] if extra else 'the order'!r})"
        )
    state_path = root / STATE_NAME
    for name, layer in model.adapted_layers:
        tensors = {k: state.get(f"{name}.{k}") for k in FACTORS}
        if any(t is None for t in tensors.values()):
            raise ValueError(f"{state_path}: no full weights for module {name!r}")
        for k, t in tensors.items():
            if t.shape != getattr(layer, k).shape:
                raise ValueError(
                    f"{state_path}: {name}.{k} has shape {tuple(t.shape)}, the model's is "
                    f"{tuple(getattr(layer, k).shape)}"
                )
        _check_state(name, tensors, state, state_path)
    if bool(meta.get("compacted", False)) != alloc.compacted:
        raise ValueError(
            f"{state_path}: saved with compacted={meta.get('compacted')}, the model has {alloc.compacted}"
        )
    if only_if_weights_match and not all(
        torch.equal(_cpu(getattr(layer, k)), state[f"{name}.{k}"]) for name, layer in model.adapted_layers
        for k in FACTORS
    ):  # fmt: skip
        return False
    with torch.no_grad():
        for name, layer in model.adapted_layers:
            for k in FACTORS:
                getattr(layer, k).copy_(state[f"{name}.{k}"])
    _apply_state(alloc, state, meta, names)
    return True
