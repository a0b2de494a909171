"""The model wrapper: it assembles the package. Injects :class:`SVDLinear` layers into the target
modules, adds the regulariser to the loss, drives the rank allocator, and orchestrates checkpoints
(it hands plain dicts to :mod:`adalora_fast.checkpoint` and takes them back).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .allocator import RankAllocator, check_state, reject_sharded_adapters
from .checkpoint import CHECKPOINT_FILES, lora_export, peft_format, training_state
from .checkpoint.files import to_cpu
from .checkpoint.peft_format import parse_rank_pattern
from .checkpoint.reader import read_checkpoint
from .checkpoint.transaction import DirectoryWrite
from .config import AdaLoraConfig
from .distributed import check_training_engine
from .factors import FACTORS, check_factor_shapes, expand_pattern
from .functional import orth_regularization
from .layer import SVDLinear
from .peft_api import LOAD_OTHER_ADAPTER, UNSUPPORTED, PeftModelApi, unsupported_error
from .reference import adapter_scale
from .saved_modules import (
    bias_names,
    check_saved_biases,
    check_saved_tensors,
    find_modules_to_save,
    load_saved_tensors,
    modules_to_save_for,
    saved_tensors,
    wrap_modules_to_save,
)
from .targets import (
    base_features,
    config_targets,
    replace_module,
    replicate_layers,
    resolved_target_modules,
)


def _creation_pattern(
    config: AdaLoraConfig, adapted: list[str], adapter_name: str, is_trainable: bool
) -> dict[str, list[bool]] | None:
    """The ``rank_pattern`` a config brings to a new model, checked against the adapted modules
    (``{module: [bool] * init_r}``; modules it does not name keep every rank), or None. A model for
    inference does not apply it (PEFT only reads it to save and to mask in its final phase): it is
    dropped with a warning; to serve a pruned adapter, load its checkpoint with ``from_pretrained``."""
    if config.rank_pattern is None:
        return None
    if not is_trainable:
        warnings.warn(
            "rank_pattern given at creation of a model for inference is not applied; to load a pruned "
            "adapter, use AdaLoraModel.from_pretrained(model, checkpoint_dir)",
            stacklevel=4,
        )
        config.rank_pattern = None
        return None
    pattern = parse_rank_pattern(config.rank_pattern, adapter_name, source="AdaLoraConfig.rank_pattern")
    assert pattern is not None
    names = set(adapted)
    for name, keep in pattern.items():
        if name not in names:
            raise ValueError(
                f"AdaLoraConfig.rank_pattern names {name + '.lora_E'!r}, which is not an adapted module "
                f"(adapted: {', '.join(adapted[:3])}{', ...' if len(adapted) > 3 else ''})"
            )
        if len(keep) != config.init_r:
            raise ValueError(
                f"AdaLoraConfig.rank_pattern of {name!r} has {len(keep)} entries, init_r is {config.init_r}"
            )
    return pattern


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


class AdaLoraModel(PeftModelApi, nn.Module):
    """A transformers (or any torch) model with AdaLoRA adapters on its target linears.

    ``forward`` calls the wrapped model and, when it returns a loss, adds
    ``orth_reg_weight * orth_regularization()`` to it (whatever the task). It plays both PEFT roles,
    ``peft.PeftModel`` and its tuner (``base_model`` is the model itself): see :mod:`adalora_fast.peft_api`.
    """

    # transformers' flag for "trainable adapters are attached": its Trainer refuses to fine-tune a
    # quantised model without them (validate_quantization_for_training) and reads it here.
    _hf_peft_config_loaded = True
    # True where the training loop all-reduces the adapter gradients itself (no DDP, no
    # adalora_fast.fully_shard): the forward then trusts it on more than one process.
    gradients_synchronised_by_user = False

    def __init__(
        self,
        model: nn.Module,
        config: AdaLoraConfig | Any,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        *,
        is_trainable: bool | None = None,
    ) -> None:
        """PEFT's tuner signature. ``config``: ours, a ``peft.AdaLoraConfig``, a dict of PEFT's fields, or
        the tuner's ``{adapter_name: config}``. ``is_trainable=None`` means ``not config.inference_mode``.
        ``low_cpu_mem_usage`` (PEFT: adapters on the meta device, for loading) makes no difference here:
        the adapters are created as usual (they are small)."""
        super().__init__()
        self.orth_reg_added_by_caller = False  # see regulariser_outside_forward
        if isinstance(config, dict) and set(config) == {adapter_name}:
            config = config[adapter_name]
        config = AdaLoraConfig.coerce(config)
        config.validate()  # also fields changed since the config was made
        if is_trainable is None:
            is_trainable = not config.inference_mode
        self.adapter_name = adapter_name
        self.model = model
        self.adalora_config = config
        self.backend = config.resolved_backend
        # PEFT's LoRA layer replication, before anything is targeted; undone if the config is refused.
        adapted = next((n for n, m in model.named_modules() if isinstance(m, SVDLinear)), None)
        if adapted is not None:
            raise ValueError(
                f"the model is already adapted by adalora_fast (module {adapted!r} is an SVDLinear): train "
                "the AdaLoraModel that holds it, or adapt a fresh base model"
            )
        undo = replicate_layers(model, config.layer_replication) if config.layer_replication else None
        # As PEFT's task models: the task head is trained and saved (SEQ_CLS: classifier / score).
        config.modules_to_save = modules_to_save_for(config.task_type, config.modules_to_save)
        try:
            self.adapted_names = config_targets(model, config)
            start_pattern = _creation_pattern(config, self.adapted_names, adapter_name, is_trainable)
        except BaseException:
            if undo is not None:
                undo()
            raise
        # As PEFT, the config records what was applied (its default list, the names of a shorthand).
        config.target_modules = resolved_target_modules(model, config.target_modules, self.adapted_names)
        for p in model.parameters():
            p.requires_grad_(False)
        _warn_fan_in_fan_out(model, config, self.adapted_names)
        to_save = find_modules_to_save(model, config.modules_to_save or [])
        self.trained_biases = list(bias_names(model, config.bias, self.adapted_names, to_save))
        for name in self.adapted_names:
            base = model.get_submodule(name)
            layer = SVDLinear(
                base,
                config.init_r,
                config.lora_alpha,
                config.lora_dropout,
                backend=self.backend,
                init_lora_weights=bool(config.init_lora_weights),  # PEFT: any truthy value is AdaLoRA's init
            )
            replace_module(model, name, layer)
        self.saved_module_names = wrap_modules_to_save(model, config.modules_to_save or [], adapter_name)
        for name in self.trained_biases:  # PEFT's bias="all" / "lora_only"
            model.get_parameter(name).requires_grad_(True)
        self.reset_forward()
        self.is_trainable = is_trainable
        self.rank_allocator: RankAllocator | None = None
        if is_trainable:
            self.build_allocator()
            if start_pattern is not None:
                self._start_from_pattern(start_pattern)
        else:
            self.requires_grad_(False)
        # As PeftModel.__init__ (is_gradient_checkpointing's new name, which does not warn, first).
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if getattr(model, "is_gradient_checkpointing", True) if checkpointing is None else checkpointing:
            self.prepare_model_for_gradient_checkpointing(model)

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
            if name in UNSUPPORTED:  # else transformers' own adapter methods answer, misleadingly
                raise unsupported_error(name) from None
            return getattr(self.model, name)

    def build_allocator(self) -> None:
        """(Re)create the allocator for the current layers (after resizing layers)."""
        self.rank_allocator = RankAllocator(self.adapted_layers, self.adalora_config, self.backend)

    def _start_from_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """A ``rank_pattern`` given at creation, as PEFT keeps it: the recorded pattern (saved
        checkpoints hold its ranks, steps past ``total_step - tfinal`` mask with it) until the first
        mask step replaces it. Nothing is masked now: every rank still trains."""
        alloc = self.rank_allocator
        assert alloc is not None
        keep = {
            name: torch.tensor(pattern.get(name, [True] * layer.init_r))
            for name, layer in self.adapted_layers
        }
        state = alloc.state_dict()
        state.update(keep=keep, masked=True, budget=sum(int(k.sum()) for k in keep.values()))
        alloc.load_state_dict(state, "AdaLoraConfig.rank_pattern")

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
        if torch.is_grad_enabled() and self.rank_allocator is not None:  # a forward that may train
            check_training_engine(self)
        outputs = self.model(*args, **kwargs)
        weight = self.adalora_config.orth_reg_weight
        if weight <= 0 or self.orth_reg_added_by_caller:
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

    @contextlib.contextmanager
    def regulariser_outside_forward(self) -> Iterator[None]:
        """Within this block ``forward`` does not add ``orth_reg_weight * R`` to the loss: the caller
        adds it to the loss it optimises (the Trainer integration does, since TRL's trainers compute
        their loss from the model's outputs, not from its ``loss``)."""
        previous, self.orth_reg_added_by_caller = self.orth_reg_added_by_caller, True
        try:
            yield
        finally:
            self.orth_reg_added_by_caller = previous

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("forward", None)  # bound to this instance: re-made on unpickling / deepcopy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.reset_forward()

    def reset_forward(self) -> None:
        """Make ``forward`` the class's own again, carrying the wrapped model's signature (undoing a
        replacement, such as the fused LM head TRL's trainers install on the model they are given)."""
        self.__dict__.pop("forward", None)
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
        """``nn.Module.state_dict``, except that no two tensors share storage and none is a view into a
        larger one: every ``lora_E`` is a view into the allocator's one λ buffer, and tied base weights
        share theirs, which safetensors refuses (writing: ``save_file`` in Trainer checkpoints;
        reading: ``load_model``, as accelerate's ``load_state`` does). Such tensors are copied (λ: r
        floats per layer; a tied embedding: once more its size, while saving). ``keep_vars=True``
        returns the parameters themselves, unchanged."""
        sd = super().state_dict(*args, **kwargs)
        if kwargs.get("keep_vars", False) or (len(args) >= 3 and args[2]):
            return sd
        seen: set[tuple[torch.device, int]] = set()
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
                where = (t.device, storage.data_ptr())
                whole = t.data_ptr() == storage.data_ptr() and t.nbytes == storage.nbytes()
            except RuntimeError:  # a wrapper tensor subclass (torchao's NF4Tensor): no storage of its own
                continue
            if where in seen or not whole:
                sd[key] = t.clone()
            else:
                seen.add(where)
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

    def _sync_rank_pattern(self) -> dict[str, list[bool]] | None:
        """Write the current pattern into the config as PEFT keeps it during training (``rank_pattern``,
        ``{module}.lora_E`` keys), when the config is read (one host sync) rather than on every mask step."""
        pattern = self._saved_rank_pattern()
        self.adalora_config.rank_pattern = (
            None if pattern is None else {f"{n}.lora_E": p for n, p in pattern.items()}
        )
        return pattern

    def kept_ranks(self) -> dict[str, int]:
        return {n: sum(p) for n, p in self.rank_pattern.items()}

    def total_kept_rank(self) -> int:
        """The total kept rank of all adapted layers (one host sync: for logging)."""
        if self.rank_allocator is None:
            return sum(layer.r for _, layer in self.adapted_layers)
        return self.rank_allocator.total_kept_rank()

    # ---- checkpoints ----------------------------------------------------------------------------
    def kept_factors(
        self, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{module: {"lora_A": (k, d_in), "lora_E": (k, 1), "lora_B": (d_out, k)}}``: CPU copies of the
        kept ranks of every adapted layer (what a PEFT checkpoint holds; k may be 0): the allocator's
        keep masks once it has masked, else every rank the layer holds. ``state_dict`` (this model's,
        e.g. gathered by a distributed engine) supplies the full factors instead of the layers."""
        alloc = self.rank_allocator
        keep = alloc.keep_mask() if alloc is not None and alloc.masked else {}
        out = {}
        for name, tensors in self._full_factors(state_dict).items():
            if name in keep:
                idx = keep[name].to("cpu", torch.bool)
                tensors = {"lora_A": tensors["lora_A"][idx], "lora_E": tensors["lora_E"][idx],
                           "lora_B": tensors["lora_B"][:, idx]}  # fmt: skip
            out[name] = {k: t.contiguous() for k, t in tensors.items()}
        return out

    def _full_factors(
        self, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of every layer's A, E, B, from the layers or from this model's ``state_dict``."""
        if state_dict is None:
            return {
                name: {k: to_cpu(getattr(layer, k)) for k in FACTORS} for name, layer in self.adapted_layers
            }
        out = {}
        for name, layer in self.adapted_layers:
            tensors = {}
            for k in FACTORS:
                key = next((c for c in (f"model.{name}.{k}", f"{name}.{k}") if c in state_dict), None)
                if key is None:
                    raise ValueError(f"save_pretrained: state_dict has no 'model.{name}.{k}'")
                tensors[k] = to_cpu(state_dict[key])
            check_factor_shapes(
                tensors, layer.in_features, layer.out_features, f"state_dict: module {name!r}"
            )
            out[name] = tensors
        return out

    def _saved_rank_pattern(self) -> dict[str, list[bool]] | None:
        """The rank pattern a checkpoint records: None while every layer holds and keeps all init_r."""
        alloc = self.rank_allocator
        pruned = any(layer.r != layer.init_r for _, layer in self.adapted_layers)
        return self.rank_pattern if (alloc is not None and alloc.masked) or pruned else None

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the adapter in PEFT's AdaLoRA format (``adapter_config.json``,
        ``adapter_model.safetensors`` or, with ``safe_serialization=False``, ``adapter_model.bin``: kept
        ranks only; a ``README.md`` model card when the folder has none) and, for a trainable model, our
        training state (``adalora_training_state.safetensors``: full factors, scores, masks, allocator
        state), so that ``from_pretrained(..., is_trainable=True)`` resumes exactly. Each file is
        written atomically. PEFT's arguments: ``is_main_process=False`` writes nothing (other ranks);
        ``selected_adapters`` may name this model's one adapter; ``state_dict=`` (a keyword) supplies
        this model's full state dict (e.g. gathered by a distributed engine)."""
        state_dict = kwargs.pop("state_dict", None)
        if selected_adapters is not None and list(selected_adapters) != [self.adapter_name]:
            raise ValueError(
                f"save_pretrained: selected_adapters={selected_adapters!r}; this model has "
                f"{self.adapter_name!r} only"
            )
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError(
                "save_pretrained: path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters, "
                "which AdaLoRA does not have"
            )
        if save_embedding_layers is True:
            warnings.warn(
                "save_pretrained: save_embedding_layers=True: AdaLoRA adapts no embeddings", stacklevel=2
            )
        if kwargs:
            raise TypeError(f"save_pretrained: unexpected keyword arguments {sorted(kwargs)}")
        if not self.adapted_names:
            raise RuntimeError(
                "save_pretrained: this AdaLoraModel has no adapters any more (merge_and_unload() or unload() "
                "removed them); save the returned base model with its own save_pretrained"
            )
        if not is_main_process:
            return
        out = Path(save_directory)
        if out.is_file():
            raise ValueError(f"save_pretrained: {out} is a file, not a directory")
        alloc = self.rank_allocator
        config = self.adalora_config
        if config.total_step is None:
            warnings.warn(
                "saving with total_step=None: PEFT refuses to load such a checkpoint; set total_step first "
                "(model.set_total_step(n)) if PEFT must read it",
                stacklevel=2,
            )
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = _name_or_path(self.model)
        pattern = self._sync_rank_pattern()
        cfg = peft_format.config_dict(
            config,
            pattern,
            config.target_modules,  # resolved by __init__ (PEFT's default list, a shorthand's names)
            any(layer.fan_in_fan_out for _, layer in self.adapted_layers),
        )
        full = self._full_factors(state_dict)
        weights = {**self.kept_factors(state_dict), **saved_tensors(self.model, self.saved_module_names)}
        for name in self.trained_biases:
            module, _, leaf = name.rpartition(".")
            weights.setdefault(module, {})[leaf] = to_cpu(self.model.get_parameter(name)).contiguous()
        # One unit: the old checkpoint or the new one in `out`, whenever this is interrupted.
        with DirectoryWrite(out, CHECKPOINT_FILES) as tx:
            peft_format.write_adapter(tx, cfg, weights, safe_serialization)
            peft_format.write_model_card(tx, config.base_model_name_or_path, config.task_type)
            if alloc is None:  # an inference model has no training state; never leave an older one
                training_state.remove_training_state(tx)
            else:
                held = {name: layer.held_pattern for name, layer in self.adapted_layers}
                state = alloc.state_dict()
                training_state.write_training_state(tx, full, state, held, config.compact_after_final)
            tx.commit()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdaLoraConfig | Any | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> AdaLoraModel:
        """Load a checkpoint written by adalora_fast or by PEFT's AdaLoRA (a local folder) onto ``model``,
        with PEFT's ``PeftModel.from_pretrained`` arguments.

        ``is_trainable=True`` resumes from our training state when the folder has one (it must belong
        to the folder's weights), else from the PEFT weights. ``config`` replaces the folder's config
        (ours or PEFT's). ``subfolder=`` names a folder inside ``model_id``. Adapters are fp32 whatever
        the base dtype (PEFT's ``autocast_adapter_dtype=True``); ``torch_device``, ``low_cpu_mem_usage``
        and ``revision`` change nothing here (the factors go to each base layer's device).
        Everything is checked against the model before the model is touched: nothing is half-loaded."""
        subfolder = kwargs.pop("subfolder", None)
        kwargs.pop("torch_device", None)
        kwargs.pop("revision", None)
        if kwargs:
            raise TypeError(f"from_pretrained: unexpected keyword arguments {sorted(kwargs)}")
        if key_mapping:
            raise ValueError(
                "from_pretrained: key_mapping is not supported (adalora_fast reads PEFT's own keys)"
            )
        if not autocast_adapter_dtype:
            warnings.warn("from_pretrained: autocast_adapter_dtype=False: adapters stay fp32", stacklevel=2)
        if ephemeral_gpu_offload:
            warnings.warn("from_pretrained: ephemeral_gpu_offload is a DoRA option; ignored", stacklevel=2)
        path = Path(model_id) / subfolder if subfolder else Path(model_id)
        ckpt = read_checkpoint(path, trainable=is_trainable)
        config = ckpt.config if config is None else AdaLoraConfig.coerce(config)
        config.inference_mode = not is_trainable  # as PEFT sets it on load
        if backend is not None:
            config.backend = backend
        adapted = next((n for n, m in model.named_modules() if isinstance(m, SVDLinear)), None)
        if adapted is not None:
            raise ValueError(
                f"the model is already adapted by adalora_fast (module {adapted!r} is an SVDLinear): train "
                "the AdaLoraModel that holds it, or adapt a fresh base model"
            )
        undo = replicate_layers(model, config.layer_replication) if config.layer_replication else None
        try:
            wrapped = cls._load(model, path, ckpt, config, is_trainable)
        except BaseException:
            if undo is not None:
                undo()  # nothing half-changed: the model gets its own layer list back
            raise
        return wrapped

    @classmethod
    def _load(
        cls, model: nn.Module, path: Path, ckpt: Any, config: AdaLoraConfig, is_trainable: bool
    ) -> AdaLoraModel:
        """:meth:`from_pretrained` once the folder is read (and the layers replicated, if asked)."""
        state = ckpt.state
        targets = config_targets(model, config)
        sizes = {name: _sizes(name, model.get_submodule(name), ckpt.source) for name in targets}
        factors, held = ckpt.select(sizes)
        to_save = find_modules_to_save(
            model, modules_to_save_for(config.task_type, config.modules_to_save) or []
        )
        biases = bias_names(model, config.bias, targets, to_save)
        saved, saved_biases = ckpt.saved_modules(to_save, biases)
        source = str(peft_format.weights_file(path))
        check_saved_biases(model, biases, saved_biases, source)
        check_saved_tensors(model, to_save, saved, source)
        if state is not None:
            shapes = {n: {k: tuple(t.shape) for k, t in fs.items()} for n, fs in factors.items()}
            check_state(state.allocator_state(), shapes, str(state.path))

        # The checkpoint's pattern is applied below; the layers are already replicated.
        pattern, config.rank_pattern = config.rank_pattern, None
        replication, config.layer_replication = config.layer_replication, None
        wrapped = cls(model, config, is_trainable=False)
        config.rank_pattern, config.layer_replication = pattern, replication
        for name, layer in wrapped.adapted_layers:
            tensors = factors[name]
            r = tensors["lora_A"].shape[0]
            if r != layer.r:
                layer.resize(r, held[name])
            with torch.no_grad():
                for k, t in tensors.items():
                    getattr(layer, k).copy_(t)
        load_saved_tensors(wrapped.model, saved)
        with torch.no_grad():
            for key, t in saved_biases.items():
                wrapped.model.get_parameter(key).copy_(t)
        wrapped.is_trainable = is_trainable
        if not is_trainable:
            wrapped.requires_grad_(False)
            wrapped.eval()
            return wrapped
        for _, layer in wrapped.adapted_layers:
            for k in FACTORS:
                getattr(layer, k).requires_grad_(True)
        for name in wrapped.saved_module_names:
            wrapper = wrapped.model.get_submodule(name)
            wrapper.modules_to_save[wrapper.active_adapter].requires_grad_(True)
        for name in wrapped.trained_biases:
            wrapped.model.get_parameter(name).requires_grad_(True)
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

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str | None = None,
        is_trainable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a checkpoint of this model's own adapter into it, in place (PEFT's ``load_adapter`` for
        the adapter this model holds; what transformers' Trainer calls to resume and to restore the
        best checkpoint): A, E, B into the same parameters (so an optimizer keeps them), the modules
        to save, trained biases and, for a trainable model, the allocator's scores, masks and flags
        when the folder has our training state. The folder must hold the adapted modules and ranks
        this model holds (a checkpoint of this run; other folders load with :meth:`from_pretrained`).
        Everything is checked before anything is copied. ``subfolder=`` names a folder inside
        ``model_id``; ``is_trainable`` must agree with the model (a PEFT argument: the model already
        is trainable or not)."""
        subfolder = kwargs.pop("subfolder", None)
        for ignored in ("torch_device", "revision", "autocast_adapter_dtype", "low_cpu_mem_usage"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"load_adapter: unexpected keyword arguments {sorted(kwargs)}")
        if adapter_name is not None and adapter_name != self.adapter_name:
            raise ValueError(
                f"load_adapter: adapter_name={adapter_name!r}: {LOAD_OTHER_ADAPTER} (this model's is "
                f"{self.adapter_name!r}, loaded in place)"
            )
        alloc = self.rank_allocator
        if is_trainable is not None and bool(is_trainable) != (alloc is not None):
            raise ValueError(
                f"load_adapter: is_trainable={is_trainable}, but this model was created "
                f"{'for training' if alloc is not None else 'for inference'}"
            )
        path = Path(model_id) / subfolder if subfolder else Path(model_id)
        ckpt = read_checkpoint(path, trainable=alloc is not None)
        layers = dict(self.adapted_layers)
        factors, held = ckpt.select({n: (m.in_features, m.out_features) for n, m in layers.items()})
        patterns: dict[str, list[bool]] = {}  # kept ranks of a pruned PEFT adapter, spread back out
        for name, layer in layers.items():
            r = factors[name]["lora_A"].shape[0]
            if r == layer.r and held[name] == layer.held_pattern:
                continue
            pattern = held[name]
            if ckpt.state is None and layer.held_pattern is None and layer.r == layer.init_r and pattern:
                factors[name] = _spread_ranks(factors[name], pattern)  # masked ranks: zeros
                patterns[name] = pattern
                continue
            raise ValueError(
                f"{ckpt.source}: module {name!r} holds rank {r}, this model's layer {layer.r} (another "
                "rank pattern): load_adapter loads a checkpoint of this model's ranks; use "
                "AdaLoraModel.from_pretrained(base_model, path) for this one"
            )
        saved, saved_biases = ckpt.saved_modules(self.saved_module_names, {k: k for k in self.trained_biases})
        source = str(peft_format.weights_file(path))
        check_saved_biases(self.model, {k: k for k in self.trained_biases}, saved_biases, source)
        check_saved_tensors(self.model, self.saved_module_names, saved, source)
        state = ckpt.state
        if state is not None and alloc is not None:
            check_state(state.allocator_state(), alloc.factor_shapes(), str(state.path))
        with torch.no_grad():
            for name, layer in layers.items():
                for k, t in factors[name].items():
                    getattr(layer, k).copy_(t)
            for key, t in saved_biases.items():
                self.model.get_parameter(key).copy_(t)
        load_saved_tensors(self.model, saved)
        if state is not None and alloc is not None:
            alloc.load_state_dict(state.allocator_state(), str(state.path))
        elif patterns and alloc is not None:
            self._start_from_pattern(patterns)  # the checkpoint's pattern, no scores: as PEFT resumes

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
        saved = saved_tensors(self.model, self.saved_module_names)
        return lora_export.write_lora_adapter(
            Path(path), self.kept_factors(), scales, fan_in_fan_out, self.adalora_config, saved
        )

    # ---- merging --------------------------------------------------------------------------------
    def merge(self, exact_unmerge: bool = True) -> None:
        """Fold every layer's update into its base weight (:meth:`SVDLinear.merge`): inference then
        runs at the base model's cost. ``exact_unmerge=True`` keeps each original weight (the base
        model's adapted weights once more in memory) so that :meth:`unmerge` restores them bit for
        bit; ``False`` keeps nothing (unmerge then subtracts the update, exact to the weights'
        rounding). Already merged layers are left alone."""
        self._check_mergeable()
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

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's name for :meth:`merge` (the originals are kept: :meth:`unmerge_adapter` restores them
        bitwise). ``safe_merge``: see :meth:`merge_and_unload`."""
        self._check_adapter_names(adapter_names, "merge_adapter")
        if safe_merge:
            self._check_finite_merge()
        self.merge()

    def unmerge_adapter(self) -> None:
        """PEFT's name for :meth:`unmerge`."""
        self.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold every update into its base weight (computed in fp32, cast once) and return the plain
        base model with the original module types (and the trained modules to save). Layers already
        merged are not merged twice. ``safe_merge=True`` first checks that every merged weight is
        finite and raises ``ValueError`` before any layer changes (PEFT checks layer by layer, after
        merging the layers before). ``progressbar``: tqdm over the layers. ``adapter_names``: None or
        this model's one adapter."""
        self._check_adapter_names(adapter_names, "merge_and_unload")
        if safe_merge:
            self._check_finite_merge()
        return self._unload(merge=True, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """The base model with its original module types and weights (merged layers are unmerged
        first, bitwise after ``merge()``; PEFT's ``unload`` would leave them merged), the adapters
        removed."""
        return self._unload(merge=False, progressbar=False)

    @torch.no_grad()
    def _unload(self, merge: bool, progressbar: bool) -> nn.Module:
        desc = "Unloading " + ("and merging " if merge else "") + "model"
        if merge:
            self._check_mergeable()
        for name, layer in tqdm(self.adapted_layers, disable=not progressbar, desc=desc):
            if merge and not layer.merged:
                layer.merge(exact_unmerge=False)
            elif not merge and layer.merged:
                layer.unmerge()
            replace_module(self.model, name, layer.base_layer)
        self._unwrap_saved_modules()
        self.adapted_names = []
        self.rank_allocator = None
        return self.model

    @torch.no_grad()
    def _check_mergeable(self) -> None:
        """``TypeError`` naming the first layer whose base weight cannot be merged into; nothing changes."""
        for name, layer in self.adapted_layers:
            refusal = None if layer.merged else layer.merge_refusal()
            if refusal is not None:
                raise TypeError(f"cannot merge {name!r}: {refusal}; nothing was merged")

    def _check_finite_merge(self) -> None:
        """``ValueError`` unless every unmerged layer's merged weight (as ``merge`` computes it) is
        finite, and ``TypeError`` if one cannot be merged at all; nothing changes."""
        self._check_mergeable()
        for name, layer in self.adapted_layers:
            if not layer.merged and not torch.isfinite(layer.merged_weight()).all():
                raise ValueError(
                    f"NaNs detected in the merged weights of {name!r}. The adapter {self.adapter_name} "
                    "seems to be broken; nothing was merged"
                )

    def _unwrap_saved_modules(self) -> None:
        """Put each module to save's trained copy where its wrapper is (PEFT's unload does the same)."""
        for name in self.saved_module_names:
            wrapper = self.model.get_submodule(name)
            replace_module(self.model, name, wrapper.modules_to_save[wrapper.active_adapter])
        self.saved_module_names = []


def get_adalora_model(model: nn.Module, config: AdaLoraConfig | Any) -> AdaLoraModel:
    """Wrap ``model`` with AdaLoRA adapters on the modules ``config`` targets."""
    return AdaLoraModel(model, config)


def get_peft_model(
    model: nn.Module,
    peft_config: AdaLoraConfig | Any,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> AdaLoraModel:
    """``peft.get_peft_model`` for AdaLoRA configs (ours or PEFT's): an :class:`AdaLoraModel`, which is
    both the ``PeftModel`` and its tuner (``model.base_model`` is the model itself). Other PEFT methods
    and ``mixed=True`` are refused. Adapters are fp32 on any base (``autocast_adapter_dtype=False`` is
    warned about); ``low_cpu_mem_usage`` makes no difference here."""
    if mixed:
        raise ValueError("get_peft_model: mixed=True (PEFT's PeftMixedModel) is not supported here")
    peft_type = getattr(peft_config, "peft_type", None)
    peft_type = getattr(peft_type, "value", peft_type)  # PEFT's PeftType enum
    if not isinstance(peft_config, (AdaLoraConfig, dict)) and str(peft_type).upper() != "ADALORA":
        raise TypeError(
            f"get_peft_model: {type(peft_config).__name__} (peft_type {peft_type!r}) is not an AdaLoRA "
            "config; adalora_fast runs AdaLoRA only: pass an AdaLoraConfig (adalora_fast's or peft's)"
        )
    config = AdaLoraConfig.coerce(peft_config)
    if not autocast_adapter_dtype:
        warnings.warn("get_peft_model: autocast_adapter_dtype=False: adapters stay fp32", stacklevel=2)
    config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None  # as PEFT
    if revision is not None:
        config.revision = revision
    return AdaLoraModel(model, config, adapter_name, low_cpu_mem_usage)


def _spread_ranks(tensors: dict[str, torch.Tensor], pattern: list[bool]) -> dict[str, torch.Tensor]:
    """Factors saved at the kept ranks of ``pattern`` placed at those positions of full-rank ones
    (zeros at the masked ranks)."""
    idx = torch.tensor([i for i, kept in enumerate(pattern) if kept], dtype=torch.long)
    full = {}
    for k, t in tensors.items():
        shape = list(t.shape)
        dim = 1 if k == "lora_B" else 0
        shape[dim] = len(pattern)
        full[k] = t.new_zeros(shape).index_copy_(dim, idx, t)
    return full


def _warn_fan_in_fan_out(model: nn.Module, config: AdaLoraConfig, names: list[str]) -> None:
    """PEFT's warning when ``fan_in_fan_out`` does not fit the target modules; the field is then set
    to what they need (each layer reads its own layout in any case)."""
    for name in names:
        conv1d = base_features(model.get_submodule(name))[2]
        if conv1d != config.fan_in_fan_out:
            kind = "`Conv1D`" if conv1d else "`torch.nn.Linear`"
            warnings.warn(
                f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is {kind}. "
                f"Setting fan_in_fan_out to {conv1d}.",
                stacklevel=3,
            )
            config.fan_in_fan_out = conv1d


def _name_or_path(model: nn.Module) -> str | None:
    """Where the base model came from (``from_pretrained``'s path or hub id), for PEFT's
    ``base_model_name_or_path``; None for a model built from a config."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _sizes(name: str, base: nn.Module, source: Path) -> tuple[int, int]:
    """(d_in, d_out) of the model's module ``name``, which a checkpoint ``source`` adapts."""
    try:
        d_in, d_out, _ = base_features(base)
    except TypeError as err:
        raise ValueError(f"{source}: module {name!r} of the model is {type(base).__name__}: {err}") from None
    return d_in, d_out
