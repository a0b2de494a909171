"""transformers' Trainer with af.AdaLoraCallback: default TrainingArguments (remove_unused_columns=True),
total_step from the Trainer's plan, logging, checkpoint/resume with the same final rank pattern."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, tiny_llama

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1)


class TokenDataset(torch.utils.data.Dataset):
    """Random causal-LM examples with an extra column the model does not take (Trainer must drop it)."""

    def __init__(self, n: int, seq: int = 9, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "example_id": torch.tensor(i)}


def _model(seed: int = 3, **cfg) -> af.AdaLoraModel:
    torch.manual_seed(seed)
    config = af.AdaLoraConfig(target_modules=LLAMA_PROJ, **{**SCHEDULE, **cfg})
    return af.get_adalora_model(tiny_llama(2), config)


def _args(out, **kw) -> TrainingArguments:
    defaults = dict(per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, seed=0, report_to="none")
    return TrainingArguments(output_dir=str(out), **{**defaults, **kw})


def test_trainer_with_default_arguments_derives_total_step_and_reaches_the_target_budget(tmp_path):
    model = _model()
    assert model.adalora_config.total_step is None
    data = TokenDataset(24)
    args = _args(
        tmp_path, gradient_accumulation_steps=2, num_train_epochs=2, logging_steps=1, save_strategy="no"
    )
    assert args.remove_unused_columns  # the default: Trainer reads our forward's signature
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[af.AdaLoraCallback()])
    trainer.train()
    planned = trainer.state.max_steps
    assert planned == 2 * 24 // (4 * 2)  # epochs x examples / (batch x accumulation)
    assert model.adalora_config.total_step == planned
    assert model.rank_allocator.finalized
    kept = sum(model.kept_ranks().values())
    assert kept == SCHEDULE["target_r"] * len(model.adapted_names)
    logged = [h for h in trainer.state.log_history if "loss" in h]  # one per optimizer step
    assert len(logged) == planned and all("adalora/budget" in h for h in logged)
    assert logged[-1]["adalora/budget"] == kept and logged[-1]["adalora/kept_rank"] == kept
    assert logged[0]["adalora/budget"] == SCHEDULE["init_r"] * len(model.adapted_names)


def test_schedule_that_does_not_fit_the_trainer_plan_is_a_clear_error(tmp_path):
    model = _model(tinit=5, tfinal=5)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6, save_strategy="no"),
                      train_dataset=TokenDataset(8), callbacks=[af.AdaLoraCallback()])  # fmt: skip
    with pytest.raises(ValueError, match="tinit"):
        trainer.train()


def _final(model: af.AdaLoraModel) -> tuple[dict, dict]:
    weights = {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in model.adapted_layers
               for k in ("lora_A", "lora_E", "lora_B")}  # fmt: skip
    return model.rank_pattern, weights


def test_resume_from_checkpoint_gives_the_uninterrupted_rank_pattern(tmp_path):
    # Interrupted in the budget phase (steps 2-9 mask at every step), so the later masks depend on the
    # importance scores that the resume must restore.
    init = _model(total_step=None)
    data = TokenDataset(48)
    kw = dict(max_steps=12, save_steps=3, logging_steps=100)

    whole = copy.deepcopy(init)
    Trainer(model=whole, args=_args(tmp_path / "a", **kw), train_dataset=data,
            callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip
    assert (tmp_path / "a" / "checkpoint-3" / "adalora_training_state.safetensors").is_file()

    # Interrupted after step 3 (its checkpoint is all that survives), then resumed by a new process.
    resumed = copy.deepcopy(init)
    trainer = Trainer(model=resumed, args=_args(tmp_path / "a", **kw), train_dataset=data,
                      callbacks=[af.AdaLoraCallback()])  # fmt: skip
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))

    pattern_whole, weights_whole = _final(whole)
    pattern_resumed, weights_resumed = _final(resumed)
    assert resumed.rank_allocator.masked
    assert pattern_resumed == pattern_whole
    for key, w in weights_whole.items():
        assert torch.equal(weights_resumed[key], w), key  # bitwise: same kernels, same data order


def test_resume_without_adalora_state_warns(tmp_path):
    init = _model()
    data = TokenDataset(16)
    kw = dict(max_steps=6, save_steps=3, logging_steps=100)
    Trainer(model=copy.deepcopy(init), args=_args(tmp_path, **kw), train_dataset=data,
            callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip
    (tmp_path / "checkpoint-3" / "adalora_training_state.safetensors").unlink()
    trainer = Trainer(model=copy.deepcopy(init), args=_args(tmp_path, **kw), train_dataset=data,
                      callbacks=[af.AdaLoraCallback()])  # fmt: skip
    with pytest.warns(UserWarning, match="without AdaLoRA training state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_resume_from_a_checkpoint_outside_output_dir(tmp_path):
    init = _model()
    data = TokenDataset(48)
    kw = dict(max_steps=12, save_steps=3, logging_steps=100)
    whole = copy.deepcopy(init)
    Trainer(model=whole, args=_args(tmp_path / "a", **kw), train_dataset=data,
            callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip
    # Another run of the same length writes its own checkpoint-3 into the output_dir resumed into:
    # the folder named is what loads (weights and training state alike).
    other = _model(seed=11)
    Trainer(model=other, args=_args(tmp_path / "b", **kw), train_dataset=TokenDataset(48, seed=5),
            callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip

    resumed = copy.deepcopy(init)
    trainer = Trainer(model=resumed, args=_args(tmp_path / "b", **kw), train_dataset=data,
                      callbacks=[af.AdaLoraCallback()])  # fmt: skip
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert _final(resumed)[0] == _final(whole)[0]
    for key, w in _final(whole)[1].items():
        assert torch.equal(_final(resumed)[1][key], w), key


def test_load_best_model_at_end_restores_the_best_checkpoints_masks(tmp_path):
    model = _model()
    kw = dict(max_steps=8, save_steps=2, eval_steps=2, eval_strategy="steps", logging_steps=100,
              load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)  # fmt: skip
    # greater_is_better=True on the loss: the best checkpoint is an early one, not the last step's.
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=TokenDataset(32),
                      eval_dataset=TokenDataset(8, seed=3), callbacks=[af.AdaLoraCallback()])  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-8")
    model.save_pretrained(tmp_path / "adapter")
    reloaded = af.AdaLoraModel.from_pretrained(tiny_llama(2), tmp_path / "adapter").eval()
    x = TokenDataset(2, seed=9).ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
    assert model.rank_pattern == af.AdaLoraModel.from_pretrained(
        tiny_llama(2), best, is_trainable=True).rank_pattern  # fmt: skip


def test_label_smoothing_shifts_causal_lm_labels_as_for_the_plain_model(tmp_path):
    data = TokenDataset(8)
    losses = []
    for wrap in (False, True):
        torch.manual_seed(0)
        base = tiny_llama(2)
        model = af.get_adalora_model(base, af.AdaLoraConfig(target_modules=LLAMA_PROJ, orth_reg_weight=0.0,
                                                            **SCHEDULE)) if wrap else base  # fmt: skip
        args = _args(tmp_path / str(wrap), max_steps=4, logging_steps=1, label_smoothing_factor=0.1,
                     learning_rate=0.0, save_strategy="no")  # fmt: skip
        callbacks = [af.AdaLoraCallback()] if wrap else []
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.train()
        losses.append(next(h["loss"] for h in trainer.state.log_history if "loss" in h))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # E = 0 at init: the same model


def test_a_second_trainer_after_bf16_training_still_sees_the_base_signature(tmp_path):
    import inspect

    model = _model()
    data = TokenDataset(8)
    Trainer(model=model, args=_args(tmp_path / "a", max_steps=4, bf16=True, save_strategy="no"),
            train_dataset=data, callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip
    assert "input_ids" in inspect.signature(model.forward).parameters
    trainer = Trainer(model=model, args=_args(tmp_path / "b", save_strategy="no"), eval_dataset=data)
    assert "eval_loss" in trainer.evaluate()


def test_compact_after_final_is_refused_under_trainer(tmp_path):
    model = _model(compact_after_final=True)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6, save_strategy="no"),
                      train_dataset=TokenDataset(8), callbacks=[af.AdaLoraCallback()])  # fmt: skip
    with pytest.raises(ValueError, match="compact_after_final"):
        trainer.train()


def test_callback_inserted_first_feeds_the_logging_integrations(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):  # stands in for a report_to integration (W&B, TensorBoard)
        seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.seen.append(dict(logs))

    trainer = Trainer(model=_model(), args=_args(tmp_path, max_steps=4, logging_steps=1, save_strategy="no"),
                      train_dataset=TokenDataset(16), callbacks=[Recorder()])  # fmt: skip
    trainer.callback_handler.callbacks.insert(0, af.AdaLoraCallback())
    trainer.train()
    steps = [logs for logs in Recorder.seen if "loss" in logs]
    assert len(steps) == 4 and all("adalora/budget" in logs for logs in steps)


def test_callback_with_a_model_it_cannot_drive_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(model=tiny_llama(2).train(), args=_args(tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=TokenDataset(8), callbacks=[af.AdaLoraCallback()])  # fmt: skip
    with pytest.raises(TypeError, match="needs an adalora_fast.AdaLoraModel or a PEFT AdaLoRA model; found "
                       "LlamaForCausalLM"):  # fmt: skip
        trainer.train()


def test_fine_tuning_again_from_a_trainable_checkpoint_needs_reset_step(tmp_path):
    """A trained adapter loaded with is_trainable=True under a new Trainer (not resume_from_checkpoint):
    refused before the first optimizer step, naming reset_step; after reset_step the new schedule runs
    from step 0 to the target budget."""
    model = _model()
    Trainer(model=model, args=_args(tmp_path / "a", max_steps=6, save_strategy="no"),
            train_dataset=TokenDataset(24), callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip
    model.save_pretrained(tmp_path / "adapter")
    again = af.AdaLoraModel.from_pretrained(tiny_llama(2), tmp_path / "adapter", is_trainable=True)
    assert again.rank_allocator.last_step == 5
    before = {n: p.detach().clone() for n, p in again.named_parameters() if p.requires_grad}
    trainer = Trainer(model=again, args=_args(tmp_path / "b", max_steps=8, save_strategy="no"),
                      train_dataset=TokenDataset(32, seed=5), callbacks=[af.AdaLoraCallback()])  # fmt: skip
    with pytest.raises(ValueError, match=r"last scored step 5.*starts at step 0.*reset_step\(\)"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in again.named_parameters() if p.requires_grad)
    again.rank_allocator.reset_step()
    again.set_total_step(8)
    trainer.train()
    assert again.rank_allocator.last_step == 7 and again.rank_allocator.finalized
    assert sum(again.kept_ranks().values()) == SCHEDULE["target_r"] * len(again.adapted_names)
