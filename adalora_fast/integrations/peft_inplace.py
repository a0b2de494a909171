"""A live PEFT AdaLoRA model accelerated in place: :func:`accelerate_peft`.

The model stays the user's ``peft.PeftModel`` (its class, its parameters, PEFT's ``save_pretrained``,
``merge_and_unload``, ``disable_adapter``, ``modules_to_save``); three of its methods are shadowed on
the instances, so that the work runs through adalora_fast:

- each AdaLoRA ``SVDLinear`` on a plain ``nn.Linear`` / ``Conv1D`` base computes its forward with
  :func:`adalora_fast.functional.svd_linear` (the fused kernels on CUDA, the torch path elsewhere);
  PEFT's own forward runs where ours cannot: adapters disabled or merged, several active adapters,
  quantised or other bases (listed in :attr:`PeftAdaLoraDriver.peft_forward_layers`);
- the tuner's ``forward`` adds ``orth_reg_weight * R`` with the vectorised regulariser;
- the tuner's ``update_and_allocate(step)`` (PEFT's documented call) runs our allocator, on PEFT's
  own ``lora_E`` parameters, and keeps PEFT's ``config.rank_pattern`` as PEFT does on mask steps (so
  PEFT's ``save_pretrained`` writes the same checkpoint).

Importance scores and masks PEFT already holds (a model accelerated mid-training) are taken over.
:meth:`PeftAdaLoraDriver.restore` gives the instances their PEFT methods back.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import functional
from ..allocator import RankAllocator
from ..checkpoint import training_state
from ..checkpoint.peft_format import parse_rank_pattern
from ..checkpoint.transaction import DirectoryWrite
from ..config import AdaLoraConfig
from ..distributed import check_training_engine
from ..factors import FACTORS
from .wrappers import wrapped_module

__all__ = ["PeftAdaLoraDriver", "accelerate_peft", "find_peft_driver", "peft_adalora_tuner"]

DRIVER_ATTR = "adalora_fast_driver"  # on PEFT's tuner (peft_model.base_model)


class _FactorParams(Mapping):
    """``{"lora_A" | "lora_E" | "lora_B": Parameter}`` of one adapter of a PEFT layer, read live."""

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        self.layer, self.adapter = layer, adapter

    def __getitem__(self, kind: str) -> nn.Parameter:
        return getattr(self.layer, kind)[self.adapter]

    def __iter__(self) -> Iterator[str]:
        return iter(FACTORS)

    def __len__(self) -> int:
        return len(FACTORS)


class PeftLayerView:
    """One PEFT AdaLoRA layer's adapter as the allocator sees an adapted layer
    (:class:`~adalora_fast.factors.AdapterLayer`); the parameters are PEFT's own."""

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        self.layer, self.adapter = layer, adapter
        self._parameters = _FactorParams(layer, adapter)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.init_r = int(layer.r[adapter])
        self.held_pattern: list[bool] | None = None

    lora_A = property(lambda self: self._parameters["lora_A"])
    lora_E = property(lambda self: self._parameters["lora_E"])
    lora_B = property(lambda self: self._parameters["lora_B"])

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def select_ranks_(self, keep: Any) -> None:
        raise NotImplementedError(
            "compacting a PEFT model in place is not supported: convert it with af.from_peft(model) first"
        )


def peft_adalora_tuner(model: object) -> Any | None:
    """PEFT's AdaLoRA tuner inside ``model`` (a ``PeftModel``, itself, or through DDP /
    ``torch.compile`` / accelerate wrappers), or None (also when PEFT is not installed)."""
    try:
        from peft.tuners.adalora import AdaLoraModel as PeftAdaLoraModel
    except ImportError:
        return None
    current: object | None = model
    for _ in range(16):
        if isinstance(current, PeftAdaLoraModel):
            return current
        tuner = getattr(current, "base_model", None) if isinstance(current, nn.Module) else None
        if isinstance(tuner, PeftAdaLoraModel):
            return tuner
        current = wrapped_module(current)
        if current is None:
            return None
    return None


def find_peft_driver(model: object) -> PeftAdaLoraDriver | None:
    """The driver :func:`accelerate_peft` attached to the PEFT AdaLoRA model inside ``model``, or None."""
    tuner = peft_adalora_tuner(model)
    return None if tuner is None else getattr(tuner, DRIVER_ATTR, None)


def accelerate_peft(model: Any, backend: str | None = None) -> PeftAdaLoraDriver:
    """Run a live PEFT AdaLoRA model (``peft.get_peft_model(m, peft.AdaLoraConfig(...))``, or one loaded
    with ``is_trainable=True``; also through DDP / accelerate / ``torch.compile`` wrappers) through
    adalora_fast, in place: see the module docstring. Returns its driver (the same one when called
    again). ``backend``: as :class:`~adalora_fast.AdaLoraConfig`'s (default ``"auto"``)."""
    tuner = peft_adalora_tuner(model)
    if tuner is None:
        raise TypeError(
            "accelerate_peft needs a PEFT AdaLoRA model (peft.get_peft_model(model, "
            f"peft.AdaLoraConfig(...))); got {type(model).__name__}"
        )
    driver = getattr(tuner, DRIVER_ATTR, None)
    if driver is not None:
        if backend is not None:
            driver.adalora_config.backend = backend
        return driver
    driver = PeftAdaLoraDriver(tuner, backend)
    setattr(tuner, DRIVER_ATTR, driver)
    return driver


class PeftAdaLoraDriver:
    """Our layer forward, regulariser and allocator attached to one PEFT AdaLoRA tuner. It answers
    the calls the Trainer integration makes of an adapted model (``adalora_config``,
    ``update_and_allocate``, ``total_kept_rank``, ``orth_regularization``, ...)."""

    def __init__(self, tuner: Any, backend: str | None = None) -> None:
        adapter = tuner.trainable_adapter_name
        peft_cfg = tuner.peft_config[adapter]
        if peft_cfg.inference_mode:
            raise ValueError(
                "accelerate_peft: the PEFT model was loaded for inference; load it with "
                "PeftModel.from_pretrained(..., is_trainable=True) to train it"
            )
        config = AdaLoraConfig.from_peft_dict(peft_cfg.to_dict())
        config.rank_pattern = None  # the live pattern goes into the allocator's keep masks
        if backend is not None:
            config.backend = backend
        self.tuner, self.adapter, self.adalora_config = tuner, adapter, config
        self.model: nn.Module = tuner.model  # the transformers model (for label names, TRL's head)
        self.layers = self._collect_layers()
        self.orth_reg_added_by_caller = False
        self.peft_forward_layers: dict[str, str] = {}  # module -> why PEFT's own forward runs it
        self.rank_allocator = RankAllocator(self.layers, config, config.backend)
        self._take_over_peft_state()
        self._install()

    # ---- set-up ---------------------------------------------------------------------------------
    def _collect_layers(self) -> list[tuple[str, PeftLayerView]]:
        from peft.tuners.adalora.layer import AdaLoraLayer

        layers = []
        for name, module in self.model.named_modules():
            if not isinstance(module, AdaLoraLayer) or self.adapter not in module.lora_A:
                continue
            if getattr(module, "merged", False):
                raise ValueError(f"accelerate_peft: module {name!r} is merged: call unmerge_adapter() first")
            view = PeftLayerView(module, self.adapter)
            if view.r != view.init_r:
                raise ValueError(
                    f"accelerate_peft: module {name!r} holds {view.r} of r={view.init_r} ranks (a pruned "
                    "checkpoint): convert it with af.from_peft(model) instead"
                )
            layers.append((name, view))
        if not layers:
            raise ValueError(f"accelerate_peft: no AdaLoRA layer holds adapter {self.adapter!r}")
        return layers

    def _take_over_peft_state(self) -> None:
        """PEFT's importance EMAs and last mask (a model accelerated mid-training), if it has any."""
        from .peft import _peft_scores

        scores = _peft_scores(self.tuner, [(n, v._parameters) for n, v in self.layers], self.adapter)
        pattern = parse_rank_pattern(
            self.tuner.peft_config[self.adapter].rank_pattern, self.adapter, source="PEFT's config"
        )
        if not scores and not pattern:
            return
        alloc = self.rank_allocator
        state = alloc.state_dict()
        if scores:
            state["scores"] = scores
        if pattern:
            keep = {n: torch.tensor(pattern[n]) for n, _ in self.layers}
            finalized = not scores
            budget = alloc.target_bgt if finalized else sum(int(k.sum()) for k in keep.values())
            state.update(keep=keep, masked=True, finalized=finalized, budget=budget)
        alloc.load_state_dict(state, "the PEFT model's allocator state")

    def _install(self) -> None:
        from peft.tuners.adalora.layer import SVDLinear

        from ..targets import base_features

        for name, view in self.layers:
            layer = view.layer
            if type(layer) is not SVDLinear:
                self.peft_forward_layers[name] = f"{type(layer).__name__} (PEFT's own forward)"
                continue
            try:
                base_features(layer.get_base_layer())
            except TypeError as err:
                self.peft_forward_layers[name] = str(err)
                continue
            layer.forward = types.MethodType(_fused_layer_forward(self), layer)
        # The engine check at the transformers model's forward (a PeftModel without a task type calls
        # the model directly, past the tuner) and in the tuner's forward (the task-type models call
        # model.forward, past its hooks); activation checkpointing never reruns either in backward,
        # where no DDP forward is running.
        self._engine_hook = self.model.register_forward_pre_hook(self._check_engine)
        tuner = self.tuner
        tuner.forward = types.MethodType(_tuner_forward, tuner)
        tuner.update_and_allocate = self.update_and_allocate
        if self.peft_forward_layers:
            kinds = sorted(set(self.peft_forward_layers.values()))
            warnings.warn(
                f"accelerate_peft: {len(self.peft_forward_layers)} of {len(self.layers)} AdaLoRA layers keep "
                f"PEFT's forward ({'; '.join(kinds)}); the allocator and regulariser cover all of them",
                stacklevel=3,
            )

    def _check_engine(self, _module: nn.Module, _args: Any) -> None:
        # Not in backward: a whole model under activation checkpointing reruns its forward there.
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            check_training_engine(self, "af.accelerate_peft(model)")

    def restore(self) -> None:
        """Give the PEFT instances their own methods back (PEFT's forward, regulariser, allocator);
        the weights keep what training gave them."""
        for _, view in self.layers:
            view.layer.__dict__.pop("forward", None)
        for attr in ("forward", "update_and_allocate"):
            self.tuner.__dict__.pop(attr, None)
        if self._engine_hook is not None:
            self._engine_hook.remove()
            self._engine_hook = None
        if getattr(self.tuner, DRIVER_ATTR, None) is self:
            delattr(self.tuner, DRIVER_ATTR)

    # ---- what training calls --------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.adalora_config.backend

    @property
    def adapted_layers(self) -> list[tuple[str, PeftLayerView]]:
        return self.layers

    @property
    def adapted_names(self) -> list[str]:
        return [n for n, _ in self.layers]

    def set_total_step(self, total_step: int) -> None:
        self.adalora_config.set_total_step(total_step)
        self.tuner.peft_config[self.adapter].total_step = total_step

    def update_and_allocate(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
        """PEFT's ``update_and_allocate(global_step)`` through our allocator; returns the step's budget.
        On the steps where PEFT writes ``config.rank_pattern`` (mask steps up to the final one), so do
        we (one host sync, as PEFT's)."""
        alloc = self.rank_allocator
        budget = alloc.update_and_allocate(global_step, optimizer=optimizer)
        cfg = self.adalora_config
        final = cfg.total_step - cfg.tfinal
        if global_step == final or (global_step < final and alloc.masked and alloc.schedule(global_step)[1]):
            self.sync_peft_rank_pattern()
        return budget

    def sync_peft_rank_pattern(self) -> None:
        """PEFT's ``config.rank_pattern`` from our masks, keyed as PEFT keys it live
        (``{module}.lora_E.{adapter}``)."""
        keep = self.rank_allocator.keep_mask()
        self.tuner.peft_config[self.adapter].rank_pattern = {
            f"{name}.lora_E.{self.adapter}": keep[name].cpu().tolist() for name, _ in self.layers
        }

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        alloc = self.rank_allocator
        keep = alloc.keep_mask()
        return {n: keep[n].cpu().tolist() if alloc.masked else [True] * v.r for n, v in self.layers}

    def kept_ranks(self) -> dict[str, int]:
        return {n: sum(p) for n, p in self.rank_pattern.items()}

    def total_kept_rank(self) -> int:
        return self.rank_allocator.total_kept_rank()

    def orth_regularization(self) -> torch.Tensor:
        """PEFT's regulariser (mean Frobenius defect of every A and B of the adapter), vectorised."""
        views = [v for _, v in self.layers]
        return functional.orth_regularization(
            [v.lora_A for v in views], [v.lora_B for v in views], backend=self.backend
        )

    @contextlib.contextmanager
    def regulariser_outside_forward(self) -> Iterator[None]:
        """Within this block the tuner's forward adds no regulariser (the caller adds it)."""
        previous, self.orth_reg_added_by_caller = self.orth_reg_added_by_caller, True
        try:
            yield
        finally:
            self.orth_reg_added_by_caller = previous

    # ---- checkpoints: our training state beside PEFT's adapter files -------------------------------
    def save_training_state(self, folder: str | Path) -> None:
        """Write our training state (full factors, scores, masks, allocator flags) into ``folder``, bound
        to the adapter weights PEFT's ``save_pretrained`` has just written there."""
        full = {n: {k: v._parameters[k].detach() for k in FACTORS} for n, v in self.layers}
        held = {n: None for n, _ in self.layers}
        with DirectoryWrite(Path(folder), (training_state.STATE_NAME,)) as tx:
            training_state.write_training_state(tx, full, self.rank_allocator.state_dict(), held, False)
            tx.commit()

    def load_training_state(self, folder: str | Path) -> bool:
        """Restore, in place, the factors and allocator state of ``folder`` (written by
        :meth:`save_training_state`) and PEFT's other saved tensors (modules to save, trained biases)
        from its adapter file, without PEFT's resize by rank pattern (the layers keep their shapes, so
        the optimizer's state still fits). False, changing nothing, when there is no training state."""
        state = training_state.read_training_state(Path(folder))
        if state is None:
            return False
        names = self.adapted_names
        if state.modules != names:
            raise ValueError(f"{state.path}: saved for other adapted modules than this PEFT model's")
        saved = {}
        for name, view in self.layers:
            tensors = state.factors(name)
            for k in FACTORS:
                t, p = tensors[k], view._parameters[k]
                if t is None or t.shape != p.shape:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"{state.path}: {name}.{k} is {got}, the PEFT model's {tuple(p.shape)}")
            saved[name] = tensors
        alloc_state = state.allocator_state()
        from ..allocator import check_state

        check_state(alloc_state, self.rank_allocator.factor_shapes(), str(state.path))
        others = self._other_adapter_tensors(Path(folder))
        with torch.no_grad():
            for name, view in self.layers:
                for k in FACTORS:
                    view._parameters[k].copy_(saved[name][k])
        if others:
            from peft.utils import set_peft_model_state_dict

            cfg = self.tuner.peft_config[self.adapter]
            pattern, cfg.rank_pattern = cfg.rank_pattern, None  # no resize: the shapes stay
            try:
                set_peft_model_state_dict(self.tuner, others, adapter_name=self.adapter)
            finally:
                cfg.rank_pattern = pattern
        self.rank_allocator.load_state_dict(alloc_state, str(state.path))
        if self.rank_allocator.masked:
            self.sync_peft_rank_pattern()
        else:
            self.tuner.peft_config[self.adapter].rank_pattern = None
        return True

    def _other_adapter_tensors(self, folder: Path) -> dict[str, torch.Tensor]:
        """The adapter file's tensors that are not A, E, B or ranknum (PEFT's keys)."""
        from peft.utils import load_peft_weights

        weights = load_peft_weights(str(folder), device="cpu")
        factor_keys = (".lora_A", ".lora_E", ".lora_B", ".ranknum")
        return {k: v for k, v in weights.items() if not any(f in k for f in factor_keys)}


# ---- the shadowed methods ----------------------------------------------------------------------
def _fused_layer_forward(driver: PeftAdaLoraDriver):
    """PEFT's ``SVDLinear.forward`` for one active adapter through our op (``driver.backend``); PEFT's
    own where the layer is disabled or merged, other adapters are active, or arguments are extra."""

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.active_adapters
        adapter = active[0] if len(active) == 1 else None
        if self.disable_adapters or self.merged or args or kwargs or adapter not in self.lora_A:
            return type(self).forward(self, x, *args, **kwargs)
        base, drop = self.get_base_layer(), self.lora_dropout[adapter]
        return functional.svd_linear(
            x, base.weight, base.bias, self.lora_A[adapter], self.lora_E[adapter], self.lora_B[adapter],
            self.ranknum[adapter], self.scaling[adapter],
            dropout_p=drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0,
            fan_in_fan_out=self.fan_in_fan_out, backend=driver.backend, base_forward=self.base_layer,
        )  # fmt: skip

    return forward


def _tuner_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """PEFT's AdaLoRA tuner forward with our regulariser (PEFT's value: the mean Frobenius defect)."""
    driver: PeftAdaLoraDriver = getattr(self, DRIVER_ATTR)
    # PEFT calls model.forward here, past the hooks of the transformers model: the engine check too.
    driver._check_engine(self.model, args)
    outputs = self.model.forward(*args, **kwargs)
    loss = getattr(outputs, "loss", None)
    if driver.orth_reg_added_by_caller or not isinstance(loss, torch.Tensor):
        return outputs
    weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
    if weight < 0:
        raise ValueError("orth_reg_weight should be greater than or equal to 0. ")  # PEFT's check
    outputs.loss = loss + weight * driver.orth_regularization()
    return outputs
