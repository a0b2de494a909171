"""Trainer checkpoints of an AdaLoraModel hold the adapter, not the frozen base: PEFT's adapter files,
our training state and Trainer's own optimizer / scheduler / RNG / JSON files; sizes side by side with
PEFT's Trainer checkpoints of the same model; ``save_model`` writes a PEFT adapter PEFT loads;
``save_total_limit``, ``load_best_model_at_end`` and ``save_only_model``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import adalora_fast as af
from adalora_fast.checkpoint.training_state import STATE_NAME
from tests.helpers import LLAMA_PROJ, tiny_llama
from tests.integration.test_trainer import TokenDataset

peft = pytest.importorskip("peft")

SCHEDULE = dict(init_r=12, target_r=4, tinit=3, tfinal=3, deltaT=1, total_step=12)
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def _base():
    return tiny_llama(2, hidden=64, intermediate=128)


def _ours(seed: int = 3) -> af.AdaLoraModel:
    torch.manual_seed(seed)
    return af.get_adalora_model(_base(), af.AdaLoraConfig(target_modules=LLAMA_PROJ, **SCHEDULE))


def _args(out: Path, **kw) -> TrainingArguments:
    defaults = dict(per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, seed=0, report_to="none",
                    max_steps=12, save_steps=2, logging_steps=100)  # fmt: skip
    return TrainingArguments(output_dir=str(out), **{**defaults, **kw})


class PeftAllocation(TrainerCallback):
    """What PEFT's AdaLoRA guide asks of a Trainer user: update_and_allocate after each optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        model.base_model.update_and_allocate(state.global_step)


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_checkpoints_hold_the_adapter_and_training_state_not_the_base(tmp_path):
    data = TokenDataset(48)
    ours = _ours()
    Trainer(model=ours, args=_args(tmp_path / "ours"), train_dataset=data,
            callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_base(), peft.AdaLoraConfig(target_modules=LLAMA_PROJ, **SCHEDULE))
    Trainer(model=theirs, args=_args(tmp_path / "peft"), train_dataset=data,
            callbacks=[PeftAllocation()]).train()  # fmt: skip

    adapter_params = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    final_from = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for step in range(2, 13, 2):
        folder = tmp_path / "ours" / f"checkpoint-{step}"
        names = {f.name for f in folder.iterdir()}
        assert names == TRAINER_FILES | ADAPTER_FILES | {STATE_NAME}, step  # no model.safetensors
        ours_bytes, peft_bytes = _bytes(folder), _bytes(tmp_path / "peft" / f"checkpoint-{step}")
        state_bytes = (folder / STATE_NAME).stat().st_size
        keys = [k for f in folder.glob("*.safetensors") for k in load_file(f)]
        assert keys and not [k for k in keys if "base_layer" in k or "embed_tokens" in k or "norm" in k]
        # Without our training state, the same files as PEFT's (the model card is shorter).
        assert ours_bytes - state_bytes <= 1.02 * peft_bytes, step
        # The training state: the full factors, and both importance EMAs while they are still used.
        scored = step < final_from
        expected = 4 * adapter_params * (3 if scored else 1)
        assert expected <= state_bytes <= 1.05 * expected + 8192, step
        if not scored:  # final pattern fixed: no scores left to save
            assert ours_bytes <= 1.5 * peft_bytes, (step, ours_bytes / peft_bytes)


def test_save_model_writes_a_peft_adapter_that_peft_loads(tmp_path):
    model = _ours()
    trainer = Trainer(model=model, args=_args(tmp_path / "run", save_strategy="no"),
                      train_dataset=TokenDataset(48), callbacks=[af.AdaLoraCallback()])  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    names = {f.name for f in (tmp_path / "final").iterdir()}
    assert ADAPTER_FILES | {"training_args.bin", STATE_NAME} == names
    loaded = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "final")).eval()
    x = TokenDataset(3, seed=9).ids
    with torch.no_grad():
        expected = model.eval()(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)
    pattern = loaded.peft_config["default"].rank_pattern  # PEFT keys it by the lora_E names
    kept = {n.removesuffix(".lora_E"): int(sum(p)) for n, p in pattern.items()}
    assert kept == model.kept_ranks() and sum(kept.values()) == SCHEDULE["target_r"] * len(kept)


def test_save_total_limit_with_load_best_model_at_end(tmp_path):
    model = _ours()
    kw = dict(save_total_limit=2, eval_steps=2, eval_strategy="steps", load_best_model_at_end=True,
              metric_for_best_model="loss", greater_is_better=True)  # fmt: skip
    # greater_is_better=True on the loss: the best checkpoint is an early one, kept by the rotation.
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=TokenDataset(48),
                      eval_dataset=TokenDataset(8, seed=3), callbacks=[af.AdaLoraCallback()])  # fmt: skip
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    left = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert len(left) == 2 and best.name in left and "checkpoint-12" in left
    assert best.name != "checkpoint-12"
    from_best = af.AdaLoraModel.from_pretrained(_base(), best, is_trainable=True)
    assert model.rank_pattern == from_best.rank_pattern
    for (name, layer), (_, other) in zip(model.adapted_layers, from_best.adapted_layers, strict=True):
        for k in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(layer, k), getattr(other, k)), (name, k)
    steps = [m.rank_allocator.state_dict()["last_step"] for m in (model, from_best)]
    assert steps[0] == steps[1]


def test_save_only_model_checkpoints_hold_the_adapter_only(tmp_path):
    model = _ours()
    Trainer(model=model, args=_args(tmp_path, save_only_model=True, save_steps=6),
            train_dataset=TokenDataset(48), callbacks=[af.AdaLoraCallback()]).train()  # fmt: skip
    for step in (6, 12):
        names = {f.name for f in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert names == ADAPTER_FILES | {STATE_NAME, "trainer_state.json", "training_args.bin"}


def test_other_models_keep_trainers_own_checkpoints(tmp_path):
    af.AdaLoraCallback()  # installs the wrappers
    torch.manual_seed(0)
    plain = _base().train()
    Trainer(model=plain, args=_args(tmp_path, max_steps=2), train_dataset=TokenDataset(8)).train()
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoint-2" / "adapter_config.json").exists()
