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

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .wrappers import unwrap_model

# Short names for the callback signatures (transformers passes model, optimizer, logs, ... in **kw).
Args, State, Control = TrainingArguments, TrainerState, TrainerControl

STATE_DIR = "adalora"  # inside each Trainer checkpoint folder
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR


class AdaLoraCallback(TrainerCallback):
    """Drives an :class:`~adalora_fast.AdaLoraModel`'s allocator from transformers' ``Trainer``."""

    def __init__(self) -> None:
        self.budget: int | None = None

    def on_train_begin(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
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
        if config.compact_after_final:
            raise ValueError(
                "AdaLoraCallback: compact_after_final=True is not supported under Trainer (its checkpoints "
                "and resume expect the parameters' shapes to stay fixed); train with soft masking and call "
                "model.compact() after trainer.train()"
            )
        base = adalora.model
        from transformers.utils.generic import find_labels

        wanted = find_labels(type(base))
        if args.label_names is None and wanted and wanted != ["labels"]:
            warnings.warn(
                f"{type(base).__name__} takes the labels {wanted}, but Trainer reads 'labels' from the "
                f"AdaLoraModel wrapper: set TrainingArguments(label_names={wanted}) for evaluation losses",
                stacklevel=2,
            )
        self.budget = None
        if state.global_step > 0 and adalora.rank_allocator is not None:
            self._restore(args, state, adalora)

    def _restore(self, args: Args, state: State, adalora: Any) -> None:
        """Our training state of the checkpoint Trainer resumed from: the one, among
        ``args.resume_from_checkpoint`` and ``output_dir/checkpoint-<step>``, whose adapter weights are
        bitwise those Trainer restored (another run's checkpoint of the same step is never taken)."""
        folders = [Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, Path(args.resume_from_checkpoint))
        for folder in folders:
            if adalora.load_training_state(folder / STATE_DIR, only_if_weights_match=True):
                return
        looked = ", ".join(str(f / STATE_DIR) for f in folders)
        warnings.warn(
            f"resuming at step {state.global_step} without AdaLoRA training state (none matching the "
            f"restored weights in {looked}): the importance scores start afresh and the rank pattern will "
            "differ from an uninterrupted run (pass TrainingArguments(resume_from_checkpoint=<folder>) when "
            "the checkpoint is outside output_dir)",
            stacklevel=3,
        )

    def on_train_end(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
        # load_best_model_at_end: Trainer has put the best checkpoint's weights back; its masks and
        # scores must follow, or save_pretrained would prune with the last step's pattern.
        best = state.best_model_checkpoint
        adalora = unwrap_model(model)
        if args.load_best_model_at_end and best and adalora.rank_allocator is not None:
            if not adalora.load_training_state(Path(best) / STATE_DIR, only_if_weights_match=True):
                warnings.warn(
                    f"load_best_model_at_end: no AdaLoRA training state matching the best weights in {best}: "
                    "the rank masks are those of the last step",
                    stacklevel=2,
                )

    def on_optimizer_step(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
        optimizer = kw.get("optimizer")
        # Called after optimizer.step() and before zero_grad(); global_step is still the 0-based step.
        self.budget = unwrap_model(model).update_and_allocate(state.global_step, optimizer=optimizer)

    def on_save(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
        if not args.should_save:
            return  # every rank holds the same adapter and scores; Trainer's writers write them
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        if folder.is_dir():
            unwrap_model(model).save_pretrained(folder / STATE_DIR)
        else:
            warnings.warn(
                f"AdaLoraCallback: no Trainer checkpoint folder {folder} (hyperparameter search runs save "
                "elsewhere): the AdaLoRA training state of this checkpoint is not saved",
                stacklevel=2,
            )

    def on_log(self, args: Args, state: State, control: Control, **kw: Any) -> None:
        model = kw.get("model")
        logs = kw.get("logs")
        if logs is None or model is None or self.budget is None:
            return
        extra = {"adalora/budget": self.budget, "adalora/kept_rank": unwrap_model(model).total_kept_rank()}
        logs.update(extra)
        # Trainer appended its copy of these logs to the history just before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
