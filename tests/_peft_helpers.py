"""PEFT AdaLoRA models trained in tests, for the interop tests (checkpoints and live conversion)."""

from __future__ import annotations

import torch
from conftest import batches


def peft_adalora(base, targets, seed: int = 1, **config):
    """``peft.get_peft_model`` with AdaLoRA on ``targets`` and non-zero singular values, so the adapters
    change the outputs from step 0."""
    import peft

    torch.manual_seed(seed)
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(target_modules=targets, **config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
    return pm


def train_peft(pm, optimizer, steps: range, seed: int = 1234) -> None:
    """PEFT's documented loop for ``steps`` (0-based optimizer steps), on the shared random batches."""
    data = batches(steps.stop, seed=seed)
    for step in steps:
        x = data[step]
        pm(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        pm.base_model.update_and_allocate(step)
        optimizer.zero_grad()


def fix_pattern_with_module_at_rank_zero(pm, module: str) -> None:
    """Run PEFT's own final mask step (``total_step - tfinal``) with ``module``'s importance EMAs zeroed,
    so that PEFT's allocator masks every rank of it (its triplet scores are the smallest)."""
    alloc = pm.base_model.rankallocator
    for key in list(alloc.exp_avg_ipt):
        if key.startswith(f"{module}.lora_"):
            alloc.exp_avg_ipt[key].zero_()
            alloc.exp_avg_unc[key].zero_()
    cfg = pm.peft_config["default"]
    # PEFT's final step masks with the scores as they are (no EMA update at that step).
    pm.base_model.update_and_allocate(cfg.total_step - cfg.tfinal)
    pattern = cfg.rank_pattern
    key = next(k for k in pattern if k.startswith(f"{module}.lora_E"))
    assert not any(pattern[key]), "the module was meant to end at rank 0"
    assert any(any(v) for v in pattern.values())
