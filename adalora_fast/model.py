"""The model wrapper: it assembles the package. Injects :class:`SVDLinear` layers into the target
modules, adds the regulariser to the loss, drives the rank allocator, and orchestrates checkpoints
(it hands plain dicts to :mod:`adalora_fast.checkpoint` and takes them back).
"""

from __future__ import annotations

import inspect
import os
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocator import RankAllocator, check_state, reject_sharded_adapters
from .checkpoint import lora_export, peft_format, training_state
from .checkpoint.files import to_cpu
from .checkpoint.reader import read_checkpoint
from .config import AdaLoraConfig
from .factors import FACTORS, check_factor_shapes, expand_pattern
from .functional import orth_regularization
from .layer import SVDLinear
from .reference import adapter_scale
from .targets import base_features, find_target_modules, replace_module


def _forward_with_signature(model: AdaLoraModel) -> types.MethodType | None:
    """``AdaLoraModel.forward`` bound to ``model`` as a genuine method whose function carries the
    wrapped model's signature (``__signature__``): transformers' Trainer keeps only the dataset columns
    that the forward names (``remove_unused_columns=True``), and accelerate re-binds ``forward.__func__``
    (mixed precision), which must keep that signature. The code object is the class's own, so
    torch.compile and torch.export see ordinary Python. None when the wrapped forward has no signature."""
    try:
        base = inspect.signature(model.model.forward)
    except (TypeError, ValueError):
        return None
    cls_fn = AdaLoraModel.forward
    fn = types.FunctionType(cls_fn.__code__, cls_fn.__globals__, cls_fn.__name__, cls_fn.__defaults__,
                            cls_fn.__closure__)  # fmt: skip
    fn.__kwdefaults__ = cls_fn.__kwdefaults__
    fn.__qualname__, fn.__doc__, fn.__module__ = cls_fn.__qualname__, cls_fn.__doc__, cls_fn.__module__
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fn.__signature__ = base.replace(parameters=[self_param, *base.parameters.values()])
    return types.MethodType(fn, model)


class AdaLoraModel(nn.Module):
    """A transformers (or any torch) model with AdaLoRA adapters on its target linears.

    ``forward`` calls the wrapped model and, when it returns a loss, adds
    ``orth_reg_weight * orth_regularization()`` to it (whatever the task).
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig, is_trainable: bool = True) -> None:
        super().__init__()
        self.model = model
        self.adalora_config = config
        self.backend = config.resolved_backend
        self.adapted_names = find_target_modules(model, config.target_modules, config.exclude_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in self.adapted_names:
            base = model.get_submodule(name)
            layer = SVDLinear(
                base, config.init_r, config.lora_alpha, config.lora_dropout, backend=self.backend
            )
            replace_module(model, name, layer)
        bound = _forward_with_signature(self)
        if bound is not None:
            self.forward = bound
        self.is_trainable = is_trainable
        self.rank_allocator: RankAllocator | None = None
        if is_trainable:
            self.build_allocator()
        else:
            self.requires_grad_(False)

    # ---- access -------------------------------------------------------------------------------
    @property
    def adapted_layers(self) -> list[tuple[str, SVDLinear]]:
        return [(n, self.model.get_submodule(n)) for n in self.adapted_names]

    def get_base_model(self) -> nn.Module:
        return self.model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def build_allocator(self) -> None:
        """(Re)create the allocator for the current layers (after resizing layers)."""
        self.rank_allocator = RankAllocator(self.adapted_layers, self.adalora_config, self.backend)

    # ---- forward and regulariser ------------------------------------------------------------
    def orth_regularization(self) -> torch.Tensor:
        """``R``: mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over all adapted layers."""
        named = self.adapted_layers
        if named:  # a clear error for FSDP2-sharded adapters (else DTensor arithmetic fails inside)
            reject_sharded_adapters(((f"{named[0][0]}.lora_A", named[0][1].lora_A),))
        layers = [m for _, m in named]
        return orth_regularization([m.lora_A for m in layers], [m.lora_B for m in layers], self.backend)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        # ``labels`` is named here so that transformers' Trainer, which reads the class's forward,
        # finds the label names; instances carry the wrapped model's full signature (see __init__).
        if labels is not None:
            kwargs["labels"] = labels
        outputs = self.model(*args, **kwargs)
        weight = self.adalora_config.orth_reg_weight
        if weight <= 0:
            return outputs
        loss = getattr(outputs, "loss", None) if not isinstance(outputs, tuple) else None
        if isinstance(loss, torch.Tensor):
            outputs.loss = loss + weight * self.orth_regularization()
        elif (
            isinstance(outputs, tuple)
            and kwargs.get("labels") is not None
            and outputs
            and isinstance(outputs[0], torch.Tensor)
            and outputs[0].dim() == 0
        ):
            # return_dict=False: transformers puts the loss first when labels are given.
            outputs = (outputs[0] + weight * self.orth_regularization(), *outputs[1:])
        return outputs

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("forward", None)  # bound to this instance: re-made on unpickling / deepcopy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        bound = _forward_with_signature(self)
        if bound is not None:
            self.forward = bound

    def _get_name(self) -> str:
        # The wrapped model's class name: transformers' Trainer decides by it whether the model is a
        # causal LM (label smoothing shifts the labels then). __repr__ still says AdaLoraModel.
        return self.model._get_name()

    def __repr__(self) -> str:
        text = super().__repr__()
        return type(self).__name__ + text[len(self._get_name()) :]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``, except that no two tensors share storage: every ``lora_E`` is a view
        into the allocator's one λ buffer, and tied base weights share theirs, which safetensors
        (transformers' Trainer checkpoints) refuses to write. Later sharers are copied (λ: r floats per
        layer; a tied embedding: once more its size, while saving). ``keep_vars=True`` returns the
        parameters themselves, unchanged."""
        sd = super().state_dict(*args, **kwargs)
        if kwargs.get("keep_vars", False) or (len(args) >= 3 and args[2]):
            return sd
        seen: set[tuple[torch.device, int]] = set()
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = (t.device, t.untyped_storage().data_ptr())
            if storage in seen:
                sd[key] = t.clone()
            else:
                seen.add(storage)
        return sd

    # ---- allocation ---------------------------------------------------------------------------
    def set_total_step(self, total_step: int) -> None:
        self.adalora_config.set_total_step(total_step)

    def update_and_allocate(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Update importance scores and rank masks; call after ``optimizer.step()``, before
        ``zero_grad()``, with the 0-based step. Returns the rank budget of that step.

        Steps whose adapter gradients hold inf/NaN (fp16 steps that GradScaler skips) do not update
        the scores (see :meth:`nonfinite_score_steps`). With ``compact_after_final=True`` the call that
        fixes the final pattern (step ``total_step - tfinal``) also compacts the layers
        (:meth:`compact`) and needs ``optimizer`` to slice its state; pass it on every call."""
        if self.rank_allocator is None:
            raise RuntimeError("this AdaLoraModel was loaded for inference (is_trainable=False)")
        return self.rank_allocator.update_and_allocate(global_step, optimizer=optimizer)

    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Drop the masked ranks physically from every layer (rank 0 allowed), in place.

        A, E, B of each layer keep being the same ``nn.Parameter`` objects with sliced ``.data`` (and
        ``.grad``); ``optimizer``'s per-parameter state (AdamW's ``exp_avg``/``exp_avg_sq``, any state
        tensor with the parameter's shape) is sliced to match, scalar state (``step``) is left alone.
        Outputs do not change, the adapter parameter count shrinks to the kept budget, ``ranknum``
        stays ``init_r``, :attr:`rank_pattern` still reports the init_r-long pattern, and
        :meth:`save_pretrained` writes the same PEFT checkpoint as the soft-masked model.

        Allowed once the final pattern is recorded (``update_and_allocate(total_step - tfinal)``);
        before any mask step, on an already compacted model, or on a model loaded for inference
        (whose layers already hold only their kept ranks) it does nothing. Returns whether it
        compacted. While the pattern can still change (budget phase) it raises ``RuntimeError``.

        With ``orth_reg_weight > 0`` the regulariser afterwards sees only the kept ranks; under soft
        masking the masked rows of A and columns of B keep entering it (and being trained by it), so
        the two trainings then differ by that term. With ``orth_reg_weight == 0`` (and no global
        gradient-norm clipping, whose norm includes the masked E gradients under soft masking)
        training after compaction equals soft masking to fp32 rounding.
        """
        if self.rank_allocator is None:
            return False
        return self.rank_allocator.compact(optimizer)

    @property
    def compacted(self) -> bool:
        """Whether the layers were compacted to the final rank pattern (:meth:`compact`)."""
        return self.rank_allocator is not None and self.rank_allocator.compacted

    def nonfinite_score_steps(self) -> int:
        """How many score updates were skipped because an adapter gradient held inf or NaN (fp16 steps
        that GradScaler skips). Reads the device counter ``rank_allocator.nonfinite_steps`` (one
        host sync: for logging, not for the hot loop). 0 for a model loaded for inference."""
        if self.rank_allocator is None:
            return 0
        return int(self.rank_allocator.nonfinite_steps)

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """``{adapted module name: [bool] * init_r}``: the ranks kept by the last mask step
        (all True before the first one)."""
        out: dict[str, list[bool]] = {}
        keep = self.rank_allocator.keep_mask() if self.rank_allocator is not None else {}
        masked = self.rank_allocator is not None and self.rank_allocator.masked
        for name, layer in self.adapted_layers:
            local = keep[name].cpu().tolist() if masked else [True] * layer.r
            out[name] = expand_pattern(layer.held_pattern, local, layer.init_r)
        return out

    def kept_ranks(self) -> dict[str, int]:
        return {n: sum(p) for n, p in self.rank_pattern.items()}

    def total_kept_rank(self) -> int:
        """The total kept rank of all adapted layers (one host sync: for logging)."""
        if self.rank_allocator is None:
            return sum(layer.r for _, layer in self.adapted_layers)
        return self.rank_allocator.total_kept_rank()

    # ---- checkpoints ----------------------------------------------------------------------------
    def kept_factors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{module: {"lora_A": (k, d_in), "lora_E": (k, 1), "lora_B": (d_out, k)}}``: CPU copies of the
        kept ranks of every adapted layer (what a PEFT checkpoint holds; k may be 0): the allocator's
        keep masks once it has masked, else every rank the layer holds."""
        alloc = self.rank_allocator
        keep = alloc.keep_mask() if alloc is not None and alloc.masked else {}
        out = {}
        for name, layer in self.adapted_layers:
            tensors = {k: to_cpu(getattr(layer, k)) for k in FACTORS}
            if name in keep:
                idx = keep[name].to("cpu", torch.bool)
                tensors = {"lora_A": tensors["lora_A"][idx], "lora_E": tensors["lora_E"][idx],
                           "lora_B": tensors["lora_B"][:, idx]}  # fmt: skip
            out[name] = {k: t.contiguous() for k, t in tensors.items()}
        return out

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the adapter in PEFT's AdaLoRA format (``adapter_config.json``,
        ``adapter_model.safetensors``: kept ranks only) and, for a trainable model, our training state
        (``adalora_training_state.safetensors``: full factors, scores, masks, allocator state), so that
        ``from_pretrained(..., is_trainable=True)`` resumes exactly. Each file is written atomically."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        alloc = self.rank_allocator
        pruned = any(layer.r != layer.init_r for _, layer in self.adapted_layers)
        config = self.adalora_config
        if config.total_step is None:
            warnings.warn(
                "saving with total_step=None: PEFT refuses to load such a checkpoint; set total_step first "
                "(model.set_total_step(n)) if PEFT must read it",
                stacklevel=2,
            )
        cfg = peft_format.config_dict(
            config,
            self.rank_pattern if (alloc is not None and alloc.masked) or pruned else None,
            # None: record what the defaults picked, so that PEFT finds the same modules
            config.target_modules if config.target_modules is not None else sorted(self.adapted_names),
            any(layer.fan_in_fan_out for _, layer in self.adapted_layers),
        )
        full = {name: {k: to_cpu(getattr(layer, k)) for k in FACTORS} for name, layer in self.adapted_layers}
        peft_format.write_adapter(out, cfg, self.kept_factors())
        if alloc is None:  # an inference model has no training state; never leave an older one behind
            training_state.remove_training_state(out)
            return
        held = {name: layer.held_pattern for name, layer in self.adapted_layers}
        training_state.write_training_state(out, full, alloc.state_dict(), held, config.compact_after_final)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | os.PathLike, is_trainable: bool = False, backend: str | None = None
    ) -> AdaLoraModel:
        """Load a checkpoint written by adalora_fast or by PEFT's AdaLoRA onto ``model``.

        ``is_trainable=True`` resumes from our training state when the folder has one (it must belong
        to the folder's weights), else from the PEFT weights. Everything is checked against the model
        before the model is touched: nothing is half-loaded."""
        ckpt = read_checkpoint(path, trainable=is_trainable)
        config, state = ckpt.config, ckpt.state
        if backend is not None:
            config.backend = backend
        targets = find_target_modules(model, config.target_modules, config.exclude_modules)
        sizes = {name: _sizes(name, model.get_submodule(name), ckpt.source) for name in targets}
        factors, held = ckpt.select(sizes)
        if state is not None:
            shapes = {n: {k: tuple(t.shape) for k, t in fs.items()} for n, fs in factors.items()}
            check_state(state.allocator_state(), shapes, str(state.path))

        wrapped = cls(model, config, is_trainable=False)
        for name, layer in wrapped.adapted_layers:
            tensors = factors[name]
            r = tensors["lora_A"].shape[0]
            if r != layer.r:
                layer.resize(r, held[name])
            with torch.no_grad():
                for k, t in tensors.items():
                    getattr(layer, k).copy_(t)
        wrapped.is_trainable = is_trainable
        if not is_trainable:
            wrapped.requires_grad_(False)
            wrapped.eval()
            return wrapped
        for _, layer in wrapped.adapted_layers:
            for k in FACTORS:
                getattr(layer, k).requires_grad_(True)
        wrapped.build_allocator()
        if state is not None:
            wrapped.rank_allocator.load_state_dict(state.allocator_state(), str(state.path))
        return wrapped

    def load_training_state(self, path: str | os.PathLike, only_if_weights_match: bool = False) -> bool:
        """Restore this trainable model in place from our checkpoint ``path`` (written by
        :meth:`save_pretrained` of a model with the same adapted modules): A, E, B (copied into the same
        parameters, so optimizers keep them), importance EMAs, keep masks and allocator state. This is
        how a trainer that restores the rest (optimizer, RNG, step) itself resumes exactly. Returns
        False, changing nothing, when ``path`` holds no training state, or (``only_if_weights_match``)
        when its A, E, B are not bitwise the model's. Raises ``ValueError`` (nothing changed) when the
        state does not fit the model."""
        alloc = self.rank_allocator
        if alloc is None:
            raise RuntimeError("load_training_state: the model was loaded for inference (is_trainable=False)")
        state = training_state.read_training_state(Path(path))
        if state is None:
            return False
        names = list(self.adapted_names)
        if state.modules != names:
            extra = sorted(set(state.modules) - set(names)) or sorted(set(names) - set(state.modules))
            raise ValueError(
                f"{state.path}: saved for other adapted modules than this model's "
                f"(first difference: {extra[0] if extra else 'the order'!r})"
            )
        saved = {}
        for name, layer in self.adapted_layers:
            tensors = state.factors(name)
            if any(t is None for t in tensors.values()):
                raise ValueError(f"{state.path}: no full weights for module {name!r}")
            where = f"{state.path}: module {name!r}"
            r = check_factor_shapes(tensors, layer.in_features, layer.out_features, where)
            if r != layer.r:
                raise ValueError(f"{where} was saved at rank {r}, the layer holds {layer.r}")
            saved[name] = tensors
        allocator_state = state.allocator_state()
        check_state(allocator_state, alloc.factor_shapes(), str(state.path))
        if allocator_state["compacted"] != alloc.compacted:
            raise ValueError(
                f"{state.path}: saved with compacted={state.meta.get('compacted')}, "
                f"the model has {alloc.compacted}"
            )
        if only_if_weights_match and not all(
            torch.equal(to_cpu(getattr(layer, k)), saved[name][k]) for name, layer in self.adapted_layers
            for k in FACTORS
        ):  # fmt: skip
            return False
        with torch.no_grad():
            for name, layer in self.adapted_layers:
                for k in FACTORS:
                    getattr(layer, k).copy_(saved[name][k])
        alloc.load_state_dict(allocator_state, str(state.path))
        return True

    def export_lora(self, path: str | os.PathLike) -> dict[str, int]:
        """Write the adapter as a standard PEFT LoRA adapter (kept ranks only, rank-0 modules left out,
        alpha per module so that LoRA's alpha / r is AdaLoRA's scale) that
        ``peft.PeftModel.from_pretrained`` loads with equal outputs; returns ``{module: rank}``."""
        layers = dict(self.adapted_layers)
        # Each layer's scale as the forward computes it (fp32 tensor arithmetic).
        scales = {
            name: float(adapter_scale(layer.scaling, layer.ranknum.detach().to("cpu", torch.float32)))
            for name, layer in layers.items()
        }
        fan_in_fan_out = {name: layer.fan_in_fan_out for name, layer in layers.items()}
        return lora_export.write_lora_adapter(
            Path(path), self.kept_factors(), scales, fan_in_fan_out, self.adalora_config
        )

    # ---- merging --------------------------------------------------------------------------------
    def merge(self, exact_unmerge: bool = True) -> None:
        """Fold every layer's update into its base weight (:meth:`SVDLinear.merge`): inference then
        runs at the base model's cost. ``exact_unmerge=True`` keeps each original weight (the base
        model's adapted weights once more in memory) so that :meth:`unmerge` restores them bit for
        bit; ``False`` keeps nothing (unmerge then subtracts the update, exact to the weights'
        rounding). Already merged layers are left alone."""
        for _, layer in self.adapted_layers:
            if not layer.merged:
                layer.merge(exact_unmerge=exact_unmerge)

    def unmerge(self) -> None:
        """Undo :meth:`merge` on every merged layer (see :meth:`SVDLinear.unmerge`)."""
        for _, layer in self.adapted_layers:
            if layer.merged:
                layer.unmerge()

    @property
    def merged(self) -> bool:
        """Whether every adapted layer is merged (:meth:`merge`)."""
        return bool(self.adapted_names) and all(layer.merged for _, layer in self.adapted_layers)

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold every update into its base weight (computed in fp32, cast once) and return the plain
        base model with the original module types. Layers already merged are not merged twice."""
        for name, layer in self.adapted_layers:
            if not layer.merged:
                layer.merge(exact_unmerge=False)
            replace_module(self.model, name, layer.base_layer)
        self.adapted_names = []
        self.rank_allocator = None
        return self.model


def get_adalora_model(model: nn.Module, config: AdaLoraConfig) -> AdaLoraModel:
    """Wrap ``model`` with AdaLoRA adapters on the modules ``config`` targets."""
    return AdaLoraModel(model, config)


def _sizes(name: str, base: nn.Module, source: Path) -> tuple[int, int]:
    """(d_in, d_out) of the model's module ``name``, which a checkpoint ``source`` adapts."""
    try:
        d_in, d_out, _ = base_features(base)
    except TypeError as err:
        raise ValueError(f"{source}: module {name!r} of the model is {type(base).__name__}: {err}") from None
    return d_in, d_out
