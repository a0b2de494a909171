"""``AdaLoraCallback``: AdaLoRA inside transformers' ``Trainer``.

``Trainer(model=adalora_model, args=TrainingArguments(...), callbacks=[af.AdaLoraCallback()])``:

- before training, ``total_step`` (if None) becomes the Trainer's planned optimizer steps
  (``state.max_steps``: epochs, gradient accumulation and world size included) and the schedule is
  validated;
- after every optimizer step (before ``zero_grad``), ``update_and_allocate(global_step)`` with the
  0-based step, through any wrapper (DDP, accelerate, torch.compile);
- every checkpoint gets ``adalora/``: our checkpoint of the adapter with its training state (importance
  EMAs, keep masks, allocator flags), which ``resume_from_checkpoint`` restores, so a resumed run ends
  with the same rank pattern as an uninterrupted one (Trainer restores the weights, optimizer and RNG);
- logs ``adalora/budget`` (the step's rank budget) and ``adalora/kept_rank`` (total kept rank).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .checkpoint import load_training_state
from .training import unwrap_model

STATE_DIR = "adalora"  # inside each Trainer checkpoint folder
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR


def kept_rank(model: Any) -> int:
    """The total kept rank of all adapted layers (one host sync)."""
    alloc = unwrap_model(model).rank_allocator
    if alloc is None:
        return sum(layer.r for _, layer in unwrap_model(model).adapted_layers)
    keep = list(alloc.keep_mask().values())
    return int(torch.stack([k.sum() for k in keep]).sum()) if keep else 0


class AdaLoraCallback(TrainerCallback):
    """Drives an :class:`~adalora_fast.AdaLoraModel`'s allocator from transformers' ``Trainer``."""

    def __init__(self) -> None:
        self.budget: int | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kw: Any,
    ) -> None:
        adalora = unwrap_model(model)
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
        self.budget = None
        if state.global_step > 0 and adalora.rank_allocator is not None:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}" / STATE_DIR
            if not load_training_state(adalora, folder):
                warnings.warn(
                    f"resuming at step {state.global_step} without AdaLoRA training state (no {folder}): "
                    "the importance scores start afresh and the rank pattern will differ from an "
                    "uninterrupted run",
                    stacklevel=2,
                )

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kw: Any,
    ) -> None:
        # Called after optimizer.step() and before zero_grad(); global_step is still the 0-based step.
        self.budget = unwrap_model(model).update_and_allocate(state.global_step, optimizer=optimizer)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kw: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return  # every rank holds the same adapter and scores
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        if folder.is_dir():
            unwrap_model(model).save_pretrained(folder / STATE_DIR)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        if logs is None or model is None or self.budget is None:
            return
        extra = {"adalora/budget": self.budget, "adalora/kept_rank": kept_rank(model)}
        logs.update(extra)
        # Trainer appended its copy of these logs to the history just before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
