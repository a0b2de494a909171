"""PEFT scripts run unchanged with the import swapped: PEFT's documentation example for AdaLoRA
(T5, seq2seq, ``peft_type="ADALORA"``, ``target_modules=["q", "v"]``, the loop with
``model.base_model.update_and_allocate(i_step)``) gives PEFT's losses step by step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

# PEFT's example (AdaLoraModel's docstring and update_and_allocate's), on a tiny T5 built from its
# config and random data; ``{lib}`` is the only difference between the two runs.
SCRIPT = """
import torch
from {lib} import AdaLoraConfig, {wrap}
from tests.helpers import tiny_model

config = AdaLoraConfig(
    peft_type="ADALORA",
    task_type="SEQ_2_SEQ_LM",
    init_r=12,
    lora_alpha=32,
    target_modules=["q", "v"],
    lora_dropout=0.01,
    total_step=16,
    tinit=2,
    tfinal=4,
)
model = tiny_model("t5")
torch.manual_seed(0)
model = {call}
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
losses = []
for i_step in range(config.total_step):
    g = torch.Generator().manual_seed(i_step)
    input_ids = torch.randint(0, 64, (4, 9), generator=g)
    labels = torch.randint(0, 64, (4, 5), generator=g)
    torch.manual_seed(1000 + i_step)  # the same dropout masks in both runs
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(i_step)
    optimizer.zero_grad()
    losses.append(loss.item())
"""


def _run(lib: str, wrap: str, call: str) -> tuple[list[float], object]:
    namespace: dict = {}
    exec(SCRIPT.format(lib=lib, wrap=wrap, call=call), namespace)  # noqa: S102 - our own test script
    return namespace["losses"], namespace["model"]


def test_peft_documentation_example_gives_peft_s_losses():
    theirs, pm = _run("peft", "get_peft_model", "get_peft_model(model, config)")
    ours, model = _run("adalora_fast", "get_peft_model", "get_peft_model(model, config)")
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)
    pattern = {k.removesuffix(".default"): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert model.peft_config["default"].rank_pattern == {k: list(v) for k, v in pattern.items()}
    # PEFT's tuner signature, AdaLoraModel(model, config, "default"), trains the same way
    direct, _ = _run("adalora_fast", "AdaLoraModel", 'AdaLoraModel(model, config, "default")')
    torch.testing.assert_close(torch.tensor(direct), torch.tensor(theirs), rtol=1e-5, atol=0)
