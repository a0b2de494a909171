"""``AdaLoraCallback``: AdaLoRA inside transformers' ``Trainer`` (and TRL's trainers, its subclasses).

``Trainer(model=adalora_model, args=TrainingArguments(...), callbacks=[af.AdaLoraCallback()])``:

- before training, ``total_step`` (if None) becomes the Trainer's planned optimizer steps
  (``state.max_steps``: epochs, gradient accumulation and world size included) and the schedule is
  validated;
- after every optimizer step (before ``zero_grad``), ``update_and_allocate(global_step)`` with the
  0-based step, through any wrapper (DDP, accelerate, torch.compile);
- checkpoints hold the adapter, not the frozen base: Trainer writes a model by ``save_pretrained``
  only for PEFT and transformers models, and otherwise dumps the whole state dict. So the callback,
  when created, wraps three of ``Trainer``'s model-file methods (once per process; other models go
  straight through to Trainer's own code): ``_save`` (checkpoints and ``save_model``) writes our
  ``save_pretrained`` (PEFT's adapter files, which ``peft.PeftModel.from_pretrained`` loads, and our
  training state: full factors, importance EMAs, masks, allocator flags) where Trainer would write
  ``model.safetensors``; ``_load_from_checkpoint`` (``resume_from_checkpoint``) and
  ``_load_best_model`` (``load_best_model_at_end``) load them back in place with
  :meth:`AdaLoraModel.load_adapter` (what Trainer calls on a PEFT model). Trainer saves the
  optimizer, scheduler, RNG and its JSON beside them as usual, so a resumed run equals an
  uninterrupted one;
- the loss Trainer optimises holds ``orth_reg_weight * R`` also where the model's own ``loss`` is not
  what is optimised: ``training_step`` and ``prediction_step`` are wrapped too, so that their
  ``compute_loss`` (Trainer's, TRL's, a subclass's) returns its loss plus the regulariser while the
  model's forward adds none (TRL's trainers compute their loss from per-token log-probabilities);
- logs ``adalora/budget`` (the step's rank budget) and ``adalora/kept_rank`` (total kept rank).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..checkpoint import peft_format
from ..checkpoint.training_state import STATE_NAME
from ..model import AdaLoraModel
from .peft_inplace import PeftAdaLoraDriver, accelerate_peft, find_peft_driver, peft_adalora_tuner
from .trl import redirect_fused_lm_head
from .wrappers import find_adalora_model, wrapper_chain

# Short names for the callback signatures (transformers passes model, optimizer, logs, ... in **kw).
Args, State, Control = TrainingArguments, TrainerState, TrainerControl

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name, written beside every saved model


# ---- which model Trainer trains ----------------------------------------------------------------
Driver = Any  # an AdaLoraModel, or the PeftAdaLoraDriver of a PEFT AdaLoRA model (same calls)


def _has_callback(trainer: Trainer) -> bool:
    return any(isinstance(cb, AdaLoraCallback) for cb in trainer.callback_handler.callbacks)


def find_driver(model: object, accelerate: bool) -> Driver | None:
    """The :class:`AdaLoraModel` inside ``model``, or the driver of a PEFT AdaLoRA model inside it
    (created by :func:`~.peft_inplace.accelerate_peft` when ``accelerate``), or None."""
    adalora = find_adalora_model(model)
    if adalora is not None:
        return adalora
    driver = find_peft_driver(model)
    if driver is None and accelerate and peft_adalora_tuner(model) is not None:
        driver = accelerate_peft(model)
    return driver


def _trainer_driver(trainer: Trainer, model: object | None = None) -> Driver | None:
    """The driver of the model a Trainer with an :class:`AdaLoraCallback` trains (a PEFT model is
    accelerated on first sight), or None: Trainer's own code runs."""
    return find_driver(trainer.model if model is None else model, accelerate=_has_callback(trainer))


def require_driver(model: object) -> Driver:
    """:func:`find_driver` (accelerating a PEFT AdaLoRA model), or a ``TypeError`` naming what was found."""
    driver = find_driver(model, accelerate=True)
    if driver is None:
        raise TypeError(
            f"AdaLoraCallback needs an adalora_fast.AdaLoraModel or a PEFT AdaLoRA model; found "
            f"{' -> '.join(wrapper_chain(model))} (wrap the model with adalora_fast.get_adalora_model(model, "
            "config), or peft.get_peft_model(model, peft.AdaLoraConfig(...)), before DDP / torch.compile)"
        )
    return driver


# ---- Trainer's model files ---------------------------------------------------------------------
def _save(original, self: Trainer, output_dir: str | None = None, state_dict: dict | None = None) -> None:
    driver = _trainer_driver(self)
    if isinstance(driver, PeftAdaLoraDriver):  # PEFT's files as PEFT writes them, then our state
        original(self, output_dir, state_dict)
        if self.args.should_save:
            driver.save_training_state(output_dir if output_dir is not None else self.args.output_dir)
        return None
    if driver is None:
        return original(self, output_dir, state_dict)
    output_dir = output_dir if output_dir is not None else self.args.output_dir
    if not self.args.should_save:
        return None
    os.makedirs(output_dir, exist_ok=True)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    driver.save_pretrained(output_dir, **extra)
    # The rest of Trainer._save: the tokenizer / processor and the training arguments.
    if self.processing_class is not None:
        self.processing_class.save_pretrained(output_dir)
    elif getattr(self.data_collator, "tokenizer", None) is not None:
        self.data_collator.tokenizer.save_pretrained(output_dir)
    torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
    return None


def _holds_adapter(folder: str | os.PathLike) -> bool:
    return (Path(folder) / peft_format.CONFIG_NAME).is_file()


def _load_adapter(driver: Driver, folder: str) -> bool:
    """Load ``folder`` into the trained model in place; False where Trainer's own code must (a full
    state dict of ours; a PEFT checkpoint without our training state, which PEFT's loader resizes)."""
    if isinstance(driver, PeftAdaLoraDriver):
        return driver.load_training_state(folder)
    if not _holds_adapter(folder):
        return False
    driver.load_adapter(folder)
    return True


def _load_from_checkpoint(original, self: Trainer, resume_from_checkpoint: str, model=None) -> None:
    driver = _trainer_driver(self, model)
    if driver is None:
        return original(self, resume_from_checkpoint, model)
    if not _load_adapter(driver, resume_from_checkpoint):
        original(self, resume_from_checkpoint, model)
    if not (Path(resume_from_checkpoint) / STATE_NAME).is_file():
        warnings.warn(
            f"resuming from {resume_from_checkpoint} without AdaLoRA training state (no {STATE_NAME}): "
            "the importance scores start afresh and the rank pattern will differ from an uninterrupted run",
            stacklevel=3,
        )
    return None


def _load_best_model(original, self: Trainer) -> None:
    driver = _trainer_driver(self)
    best = self.state.best_model_checkpoint
    if driver is None or best is None or not _load_adapter(driver, best):
        return original(self)
    return None  # weights, and the masks and scores of that step


# ---- the regulariser in the loss Trainer (or a subclass such as TRL's) optimises ----------------
@contextlib.contextmanager
def _regulariser_in_compute_loss(trainer: Trainer) -> Iterator[None]:
    """While Trainer runs a step, its ``compute_loss`` (Trainer's, TRL's, a user's override) returns
    its loss plus ``orth_reg_weight * R``, and the model's forward adds nothing. TRL's trainers compute
    their loss from the model's per-token outputs and never read ``outputs.loss``, where the forward
    would add R; this way every trainer optimises task + weight * R, once per ``compute_loss``."""
    adalora = _trainer_driver(trainer)
    if adalora is None or adalora.adalora_config.orth_reg_weight <= 0 or "compute_loss" in vars(trainer):
        yield  # not ours, no regulariser, or already shadowed (a nested call)
        return
    compute_loss = trainer.compute_loss

    def with_regulariser(model, inputs, return_outputs=False, **kwargs):
        with adalora.regulariser_outside_forward():
            result = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        reg = adalora.adalora_config.orth_reg_weight * adalora.orth_regularization()
        if return_outputs:
            loss, outputs = result
            return loss + reg, outputs
        return result + reg

    trainer.compute_loss = with_regulariser
    try:
        yield
    finally:
        del trainer.compute_loss


def _with_regulariser(original, self: Trainer, *args, **kwargs):
    """``training_step`` / ``prediction_step`` under :func:`_regulariser_in_compute_loss`."""
    with _regulariser_in_compute_loss(self):
        return original(self, *args, **kwargs)


def install_trainer_hooks() -> None:
    """Wrap (once) ``Trainer._save``, ``_load_from_checkpoint`` and ``_load_best_model``, so that a
    Trainer whose model holds an :class:`AdaLoraModel` saves and loads its adapter, and
    ``training_step`` / ``prediction_step``, so that its loss holds the regulariser (see the module
    docstring); every other model takes Trainer's own code unchanged."""
    for name, hook in (
        ("_save", _save),
        ("_load_from_checkpoint", _load_from_checkpoint),
        ("_load_best_model", _load_best_model),
        ("training_step", _with_regulariser),
        ("prediction_step", _with_regulariser),
    ):
        original = getattr(Trainer, name)
        if not getattr(original, "__adalora_fast__", False):
            setattr(Trainer, name, _bind(hook, original))
    redirect_fused_lm_head()  # TRL's trainers: see .trl


def _bind(hook, original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return hook(original, self, *args, **kwargs)

    method.__adalora_fast__ = True  # type: ignore[attr-defined]
    return method


class AdaLoraCallback(TrainerCallback):
    """Drives the allocator of an :class:`~adalora_fast.AdaLoraModel`, or of a PEFT AdaLoRA model
    (accelerated in place by :func:`~adalora_fast.accelerate_peft` on first sight), from transformers'
    ``Trainer`` and its subclasses (TRL's)."""

    def __init__(self) -> None:
        self.budget: int | None = None
        install_trainer_hooks()

    def on_train_begin(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
        adalora = require_driver(model)
        config = adalora.adalora_config
        planned = state.max_steps
        if config.total_step is None:
            adalora.set_total_step(planned)  # validates tinit / tfinal against it
        elif config.total_step != planned:
            warnings.warn(
                f"AdaLoraConfig.total_step={config.total_step} but the Trainer plans {planned} optimizer "
                "steps: the budget schedule follows total_step (leave it None to take the Trainer's)",
                stacklevel=2,
            )
        last = adalora.rank_allocator.last_step
        if last is not None and last >= state.global_step:
            # Refused here, before the first optimizer step, rather than by update_and_allocate after it.
            raise ValueError(
                f"AdaLoraCallback: the model's allocator last scored step {last} (a trainable checkpoint "
                f"loaded with from_pretrained?), but this Trainer starts at step {state.global_step}. To "
                "continue that run, pass trainer.train(resume_from_checkpoint=...); to fine-tune again "
                "from the checkpoint with a new schedule, call model.rank_allocator.reset_step() (and "
                "model.set_total_step(n) for the new plan) before trainer.train()"
            )
        if config.compact_after_final:
            raise ValueError(
                "AdaLoraCallback: compact_after_final=True is not supported under Trainer (its checkpoints "
                "and resume expect the parameters' shapes to stay fixed); train with soft masking and call "
                "model.compact() after trainer.train()"
            )
        base = adalora.model
        from transformers.utils.generic import find_labels

        wanted = find_labels(type(base))
        ours = isinstance(adalora, AdaLoraModel)  # a PEFT model names its labels itself
        if ours and args.label_names is None and wanted and wanted != ["labels"]:
            warnings.warn(
                f"{type(base).__name__} takes the labels {wanted}, but Trainer reads 'labels' from the "
                f"AdaLoraModel wrapper: set TrainingArguments(label_names={wanted}) for evaluation losses",
                stacklevel=2,
            )
        self.budget = None

    def on_optimizer_step(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
        optimizer = kw.get("optimizer")
        # Called after optimizer.step() and before zero_grad(); global_step is still the 0-based step.
        self.budget = require_driver(model).update_and_allocate(state.global_step, optimizer=optimizer)

    def on_log(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
        logs = kw.get("logs")
        if logs is None or model is None or self.budget is None:
            return
        extra = {"adalora/budget": self.budget, "adalora/kept_rank": require_driver(model).total_kept_rank()}
        logs.update(extra)
        # Trainer appended its copy of these logs to the history just before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
