"""Train PEFT's AdaLoRA and ours side by side from the same PEFT checkpoint: same losses, same masks."""

from __future__ import annotations

import copy

import pytest
import torch

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, tiny_llama, train_side_by_side

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "schedule",
    [
        dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=20),
        dict(init_r=4, target_r=2, tinit=0, tfinal=0, deltaT=1, total_step=12),
    ],
    ids=["phases", "every-step"],
)
def test_training_matches_peft(tmp_path, schedule):
    base = tiny_llama(num_layers=2, seed=0)
    peft_base, our_base = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    peft_cfg = peft.AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=LLAMA_PROJ, lora_alpha=8, orth_reg_weight=0.5, **schedule
    )
    pm = peft.get_peft_model(peft_base, peft_cfg)
    # Non-zero singular values so that the adapters matter from step 0.
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path)

    ours = af.AdaLoraModel.from_pretrained(our_base, tmp_path, is_trainable=True)
    pm.train()
    ours.train()
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    assert len(opt_p.param_groups[0]["params"]) == len(opt_o.param_groups[0]["params"])

    total = schedule["total_step"]
    data = batches(total + 2)
    mask_steps = train_side_by_side(pm, ours, opt_p, opt_o, data, range(len(data)))
    assert mask_steps > 0
    kept = sum(sum(p) for p in ours.rank_pattern.values())
    assert kept == schedule["target_r"] * len(ours.adapted_names)
