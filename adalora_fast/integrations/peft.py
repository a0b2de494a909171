"""Live conversion of a PEFT AdaLoRA model into an :class:`~adalora_fast.AdaLoraModel`.

A checkpoint round trip loses what PEFT's format drops (the masked ranks, which may still revive in
the budget phase, and the importance EMAs); :func:`from_peft` keeps all of it:

- the adapter ``nn.Parameter`` objects themselves (A, E, B at the ranks the PEFT layers hold), so an
  optimizer built on the PEFT model keeps its state and goes on training ours;
- the config (PEFT's field names are ours);
- the keep masks of PEFT's last mask step (``rank_pattern``) and its rank allocator's sensitivity and
  uncertainty EMAs, so the next ``update_and_allocate`` continues PEFT's schedule exactly.

The base model is taken over as it is (no copy): the PEFT layers are swapped back for their base
layers and then wrapped by ours, so the PEFT model must not be used afterwards (as after PEFT's own
``unload()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.peft_format import parse_rank_pattern
from ..config import AdaLoraConfig
from ..factors import FACTORS, RANKNUM_EPS, check_factor_shapes
from ..model import AdaLoraModel
from ..targets import base_features, config_targets, replace_module


@dataclass
class _PeftLayer:
    """What one PEFT AdaLoRA layer holds for the converted adapter."""

    name: str
    base: nn.Module
    params: dict[str, nn.Parameter]
    rank: int
    scale: tuple[float, float]  # PEFT's (scaling, ranknum): the update is scaled by s / (ranknum + 1e-5)


def _tuner(peft_model: Any) -> Any:
    """PEFT's AdaLoRA tuner (``peft_model.base_model``), or a clear error."""
    try:
        from peft.tuners.adalora import AdaLoraModel as PeftAdaLoraModel
    except ImportError as err:  # pragma: no cover - from_peft is only useful with PEFT installed
        raise ImportError("adalora_fast.from_peft needs PEFT installed (pip install peft)") from err
    tuner = (
        peft_model if isinstance(peft_model, PeftAdaLoraModel) else getattr(peft_model, "base_model", None)
    )
    if not isinstance(tuner, PeftAdaLoraModel):
        kind = type(getattr(peft_model, "base_model", peft_model)).__name__
        raise TypeError(
            f"from_peft needs a PEFT AdaLoRA model (peft.get_peft_model(model, peft.AdaLoraConfig(...)) or "
            f"peft.PeftModel.from_pretrained of an AdaLoRA adapter); got {type(peft_model).__name__} "
            f"wrapping {kind}"
        )
    return tuner


def _adapter_name(tuner: Any, adapter_name: str | None) -> str:
    names = list(tuner.peft_config)
    if adapter_name is None:
        if len(names) != 1:
            raise ValueError(f"the PEFT model holds adapters {names}: pass adapter_name= to pick one")
        return names[0]
    if adapter_name not in names:
        raise ValueError(
            f"adapter_name={adapter_name!r} is not an adapter of the PEFT model (it has {names})"
        )
    return adapter_name


def _collect_layers(root: nn.Module, adapter: str) -> tuple[list[_PeftLayer], list[tuple[str, nn.Module]]]:
    """PEFT's AdaLoRA layers holding ``adapter``, and (name, base layer) of those that do not (other
    adapters' only: they are dropped too)."""
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.utils import ModulesToSaveWrapper

    layers, others = [], []
    for name, module in root.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            raise ValueError(
                f"module {name!r} is a PEFT modules_to_save copy, which from_peft does not convert yet: "
                "save the PEFT model (save_pretrained) and load it with AdaLoraModel.from_pretrained"
            )
        if not isinstance(module, AdaLoraLayer):
            continue
        if getattr(module, "merged", False):
            raise ValueError(
                f"module {name!r} of the PEFT model is merged: call peft_model.unmerge_adapter() first"
            )
        base = module.get_base_layer()
        if adapter not in module.lora_A:
            others.append((name, base))
            continue
        try:
            d_in, d_out, _ = base_features(base)
        except TypeError as err:
            raise ValueError(f"module {name!r}: {err} (quantised PEFT layers are not supported)") from None
        params = {k: getattr(module, k)[adapter] for k in FACTORS}
        rank = check_factor_shapes(params, d_in, d_out, f"PEFT's module {name!r}")
        ranknum = float(module.ranknum[adapter].detach().reshape(-1)[0])
        layers.append(_PeftLayer(name, base, params, rank, (float(module.scaling[adapter]), ranknum)))
    if not layers:
        raise ValueError(f"the PEFT model has no AdaLoRA layer with adapter {adapter!r}")
    return layers, others


def _peft_scores(
    tuner: Any, layers: list[tuple[str, Mapping[str, torch.Tensor]]], adapter: str
) -> dict[str, torch.Tensor]:
    """PEFT's sensitivity / uncertainty EMAs of ``layers`` (``(module, {factor: parameter})``) in our
    per-layer format (empty if PEFT has none)."""
    alloc = getattr(tuner, "rankallocator", None)
    if alloc is None or not alloc.exp_avg_ipt:
        return {}
    out = {}
    for name, params in layers:
        for kind in FACTORS:
            key = f"{name}.{kind}.{adapter}"
            if key not in alloc.exp_avg_ipt or key not in alloc.exp_avg_unc:
                raise ValueError(f"PEFT's rank allocator has no importance EMA for {key!r}")
            for tag, bufs in (("ema_ipt", alloc.exp_avg_ipt), ("ema_unc", alloc.exp_avg_unc)):
                t = bufs[key]
                if t.shape != params[kind].shape:
                    raise ValueError(
                        f"PEFT's importance EMA of {key!r} has shape {tuple(t.shape)}, the parameter "
                        f"{tuple(params[kind].shape)}"
                    )
                out[f"{name}.{kind}.{tag}"] = t.detach().clone()
    return out


def _same_targets(root: nn.Module, config: AdaLoraConfig, names: list[str]) -> bool:
    """Whether our matching of the config's targets picks exactly the modules PEFT adapted (PEFT's
    adapters may also have been added to or deleted from a model after its config was written)."""
    try:
        ours = config_targets(root, config)
    except ValueError:
        return False
    return sorted(ours) == sorted(names)


def from_peft(peft_model: Any, adapter_name: str | None = None, backend: str | None = None) -> AdaLoraModel:
    """Convert a live PEFT AdaLoRA model into an :class:`~adalora_fast.AdaLoraModel`.

    Keeps the adapter parameters (the same ``nn.Parameter`` objects: an optimizer built on the PEFT
    model goes on training the result), the config, PEFT's rank pattern as keep masks and its rank
    allocator's importance EMAs, so that training continues exactly where PEFT was. A PEFT model in
    inference mode (``PeftModel.from_pretrained`` without ``is_trainable``) gives an inference model.

    The allocator's flags follow from what PEFT holds: a ``rank_pattern`` means a mask step happened;
    a pattern without importance EMAs means the final pattern was fixed (PEFT clears the EMAs at step
    ``total_step - tfinal``); a PEFT model loaded pruned from a checkpoint (layers below ``init_r``)
    converts like :meth:`AdaLoraModel.from_pretrained` of that checkpoint. The step counter PEFT does
    not keep: pass the next step to ``update_and_allocate`` as with PEFT.

    Only ``adapter_name`` is converted: the layers of a PEFT model's other adapters are dropped (as by
    PEFT's ``unload()``). Adapters that train biases (``bias != "none"``), ``modules_to_save`` and merged
    PEFT models are refused. Everything is checked before anything changes; then the PEFT model's base
    is taken over (no copy) and ``peft_model`` must not be used any more.
    """
    tuner = _tuner(peft_model)
    adapter = _adapter_name(tuner, adapter_name)
    peft_cfg = tuner.peft_config[adapter]
    config = AdaLoraConfig.from_peft_dict(peft_cfg.to_dict())
    config.rank_pattern = None  # the live pattern goes into the allocator's keep masks
    if backend is not None:
        config.backend = backend
    bias = getattr(peft_cfg, "bias", "none")
    if bias != "none":
        raise ValueError(
            f"the PEFT adapter trains biases (bias={bias!r}), which from_peft does not convert yet: save the "
            "PEFT model (save_pretrained) and load it with AdaLoraModel.from_pretrained"
        )
    root = tuner.model
    layers, others = _collect_layers(root, adapter)
    pattern = parse_rank_pattern(peft_cfg.rank_pattern, adapter, source="PEFT's config")
    trainable = not peft_cfg.inference_mode
    scores = _peft_scores(tuner, [(r.name, r.params) for r in layers], adapter) if trainable else {}

    held_patterns: dict[str, list[bool] | None] = {}
    keep: dict[str, torch.Tensor] = {}
    for layer in layers:
        scaling, ranknum = layer.scale
        ours = config.scaling()
        if layer.rank > 0 and (scaling != ours or ranknum != float(config.init_r)):
            raise ValueError(
                f"module {layer.name!r}: PEFT scales its update by {scaling} / ({ranknum} + {RANKNUM_EPS}); "
                f"adalora_fast's contract is {ours} / ({config.init_r} + {RANKNUM_EPS}) (lora_alpha, init_r)"
            )
        module_pattern = None if pattern is None else pattern.get(layer.name)
        if pattern is not None and module_pattern is None:
            raise ValueError(f"PEFT's rank_pattern has no entry for module {layer.name!r}")
        if layer.rank == config.init_r:
            held_patterns[layer.name] = None
            if module_pattern is not None:
                if len(module_pattern) != config.init_r:
                    raise ValueError(
                        f"PEFT's rank_pattern of {layer.name!r} has {len(module_pattern)} entries, "
                        f"init_r is {config.init_r}"
                    )
                keep[layer.name] = torch.tensor(module_pattern)
        elif (
            module_pattern is not None
            and len(module_pattern) == config.init_r
            and sum(module_pattern) == layer.rank
        ):
            held_patterns[layer.name] = module_pattern  # loaded pruned from a checkpoint
        else:
            got = None if module_pattern is None else f"{sum(module_pattern)} of {len(module_pattern)}"
            raise ValueError(
                f"module {layer.name!r} holds {layer.rank} of init_r={config.init_r} ranks but PEFT's "
                f"rank_pattern keeps {got}: cannot tell which ranks it holds"
            )
    pruned = any(p is not None for p in held_patterns.values())
    masked = pattern is not None and not pruned and bool(keep)
    finalized = masked and not scores

    # Checked; now take the base model over.
    for layer in layers:
        replace_module(root, layer.name, layer.base)
    for name, base in others:  # layers of the PEFT model's other adapters only
        replace_module(root, name, base)
    if hasattr(root, "peft_config"):
        del root.peft_config  # PEFT's record on the base model, as PEFT's own unload() removes it
    names = [layer.name for layer in layers]
    if not _same_targets(root, config, names):
        # Kept as the user wrote them where they match (saved configs stay readable), else explicit.
        config.target_modules, config.exclude_modules = names, None
    with torch.random.fork_rng(devices=[]):  # building our layers draws initial values: not the user's RNG
        model = AdaLoraModel(root, config, is_trainable=False)
    by_name = {layer.name: layer for layer in layers}
    for name, ours in model.adapted_layers:
        params = by_name[name].params
        ours.adopt_factors(params["lora_A"], params["lora_E"], params["lora_B"], held_patterns[name])
    model.is_trainable = trainable
    model.train(peft_model.training)
    if not trainable:
        model.requires_grad_(False)
        return model
    for _, ours in model.adapted_layers:
        for kind in FACTORS:
            getattr(ours, kind).requires_grad_(True)
    model.build_allocator()
    alloc = model.rank_allocator
    assert alloc is not None
    state = alloc.state_dict()
    if scores:
        state["scores"] = scores
    if masked:
        budget = alloc.target_bgt if finalized else sum(int(k.sum()) for k in keep.values())
        state.update(keep=keep, masked=True, finalized=finalized, budget=budget)
    alloc.load_state_dict(state, "the PEFT model's allocator state")
    return model
