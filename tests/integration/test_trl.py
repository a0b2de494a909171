"""TRL's SFTTrainer with ``callbacks=[af.AdaLoraCallback()]``, given (a) our model, (b) a PEFT AdaLoRA
model, (c) ``peft_config=`` a PEFT AdaLoraConfig (TRL builds the PEFT model; the callback accelerates
both PEFT cases in place): the loss it optimises is the task loss plus orth_reg_weight x R (TRL computes
its loss from per-token log-probabilities and never reads the model's ``loss``), the run prunes to the
target budget, ``save_model`` writes a PEFT adapter PEFT loads with equal logits, and an interrupted run
resumed from its checkpoint equals the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

import adalora_fast as af
from adalora_fast import reference
from adalora_fast.integrations.trainer import require_driver
from tests.helpers import LLAMA_PROJ, tiny_llama, word_texts, word_tokenizer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1)
VARIANTS = ["ours", "peft_model", "peft_config"]


def _dataset(n: int = 48, seed: int = 0):
    return datasets.Dataset.from_dict({"text": word_texts(n, seed=seed)})


def _config(out, **kw):
    defaults = dict(max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                    report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0)  # fmt: skip
    return trl.SFTConfig(output_dir=str(out), **{**defaults, **kw})


def _trainer(variant: str, out, cls=None, seed: int = 0, **kw):
    """An SFTTrainer for ``variant`` with the AdaLoRA callback; the adapters drawn from ``seed``."""
    cls = cls or trl.SFTTrainer
    torch.manual_seed(seed)
    extra = {}
    if variant == "ours":
        model = af.get_adalora_model(tiny_llama(2), af.AdaLoraConfig(target_modules=LLAMA_PROJ, **SCHEDULE))
    else:
        config = peft.AdaLoraConfig(
            target_modules=LLAMA_PROJ, total_step=12, task_type="CAUSAL_LM", **SCHEDULE
        )
        if variant == "peft_model":
            model = peft.get_peft_model(tiny_llama(2), config)
        else:
            model, extra = tiny_llama(2), {"peft_config": config}
    return cls(model=model, args=_config(out, **kw), train_dataset=_dataset(),
               processing_class=word_tokenizer(), callbacks=[af.AdaLoraCallback()], **extra)  # fmt: skip


def _factors(trainer) -> dict[str, torch.Tensor]:
    layers = require_driver(trainer.model).adapted_layers
    return {f"{n}.{k}": getattr(layer, k).detach().clone() for n, layer in layers
            for k in ("lora_A", "lora_E", "lora_B")}  # fmt: skip


class RecordingSFTTrainer(trl.SFTTrainer):
    """Records, per training step, TRL's own loss, R recomputed in float64, and what was optimised."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.task, self.reg, self.optimised, self.hf_loss = [], [], [], []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            adalora = require_driver(model)
            layers = [layer for _, layer in adalora.adapted_layers]
            As = [layer.lora_A.detach().double() for layer in layers]
            Bs = [layer.lora_B.detach().double() for layer in layers]
            self.task.append(float(result[0] if return_outputs else result))
            self.reg.append(float(reference.orth_regularization(As, Bs)))
            with torch.no_grad():  # the task loss as the transformers model computes it
                keep = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels")}
                self.hf_loss.append(float(adalora.model(**keep).loss))
        return result

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.optimised.append(float(loss))
        return loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_sft_trainer_optimises_the_task_loss_plus_the_regulariser_and_prunes(tmp_path, variant):
    trainer = _trainer(variant, tmp_path / "run", cls=RecordingSFTTrainer)
    trainer.train()
    driver = require_driver(trainer.model)
    weight = driver.adalora_config.orth_reg_weight
    assert len(trainer.optimised) == 12 and weight > 0
    for step, (total, task, reg, hf) in enumerate(
        zip(trainer.optimised, trainer.task, trainer.reg, trainer.hf_loss, strict=True)
    ):
        assert total == pytest.approx(task + weight * reg, rel=1e-5), step
        assert task == pytest.approx(hf, rel=1e-5), step  # TRL's loss is the task loss, R not in it
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(trainer.optimised, rel=1e-4)
    assert driver.rank_allocator.finalized
    assert driver.total_kept_rank() == SCHEDULE["target_r"] * len(driver.adapted_names)

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(2), str(tmp_path / "adapter")).eval()
    x = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sft_trainer_resumes_exactly(tmp_path, variant):
    kw = dict(save_strategy="steps", save_steps=4)
    whole = _trainer(variant, tmp_path / "a", **kw)
    whole.train()
    resumed = _trainer(variant, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))  # in the budget phase
    assert require_driver(resumed.model).rank_pattern == require_driver(whole.model).rank_pattern
    expected = _factors(whole)
    for key, t in _factors(resumed).items():
        assert torch.equal(t, expected[key]), key
