"""checkpoint/peft_format.py: our checkpoints are PEFT's AdaLoRA format both ways. Saved checkpoints load
in PEFT with equal outputs (Llama with a rank-0 layer; GPT-2 Conv1D, fan_in_fan_out), PEFT's checkpoints
load pruned, rank_pattern keys with the adapter name are accepted, saving without total_step warns."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

import adalora_fast as af
from adalora_fast.checkpoint import CONFIG_NAME, STATE_NAME
from adalora_fast.testing import max_rel_err
from tests.helpers import (
    CHECKPOINT_SCHEDULE,
    LLAMA_PROJ,
    batches,
    checkpoint_model,
    logits,
    tiny_gpt2,
    tiny_llama,
    trained_model,
    trained_with_a_rank0_layer,
)


def test_saved_checkpoint_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    ours = trained_with_a_rank0_layer(copy.deepcopy(base))
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "ADALORA"
    pattern = cfg["rank_pattern"]
    assert set(pattern) == {f"{n}.lora_E" for n in ours.adapted_names}
    assert sum(pattern[f"{ours.adapted_names[1]}.lora_E"]) == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = batches(1, seed=99)[0]
    ours.eval()
    torch.testing.assert_close(logits(pm, x), logits(ours, x), rtol=1e-5, atol=1e-6)

    # Reloading in adalora_fast for inference gives pruned shapes and the same outputs.
    again = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    layer = again.model.get_submodule(ours.adapted_names[1])
    assert layer.lora_A.shape == (0, layer.in_features)
    torch.testing.assert_close(logits(again, x), logits(ours, x), rtol=1e-5, atol=1e-6)
    assert again.rank_pattern == ours.rank_pattern


def test_peft_checkpoint_loads_pruned(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    torch.manual_seed(2)
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=LLAMA_PROJ, **CHECKPOINT_SCHEDULE),
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step, x in enumerate(batches(10)):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(tmp_path)
    assert not (tmp_path / STATE_NAME).exists()
    x = batches(1, seed=5)[0]
    # The live PEFT model has revived some masked E since the last mask step; the checkpoint holds the
    # pruned adapter, so the reference is PEFT's own reload of it.
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for trainable in (False, True):
        ours = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=trainable)
        ours.eval()
        torch.testing.assert_close(logits(ours, x), logits(reloaded, x), rtol=1e-5, atol=1e-6)
        saved = json.loads((tmp_path / CONFIG_NAME).read_text())["rank_pattern"]
        for name, layer in ours.adapted_layers:
            assert layer.r == sum(saved[f"{name}.lora_E"])
            assert layer.ranknum.item() == CHECKPOINT_SCHEDULE["init_r"]
        assert ours.rank_pattern == {k[: -len(".lora_E")]: v for k, v in saved.items()}


def test_saved_gpt2_checkpoint_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")

    base = tiny_gpt2(2)
    ours = trained_model(base, ["c_attn", "c_proj", "c_fc"]).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    x = batches(1, seed=99)[0]
    assert max_rel_err(logits(pm, x), logits(ours, x)) <= 1e-5
    assert max_rel_err(logits(base, x), logits(ours, x)) > 1e-4, "the adapter must matter"


def test_save_load_gpt2_conv1d(tmp_path):
    base = tiny_gpt2(seed=0)
    model = af.get_adalora_model(copy.deepcopy(base), af.AdaLoraConfig(init_r=3, target_r=1, total_step=10))
    assert all(layer.fan_in_fan_out for _, layer in model.adapted_layers)
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.normal_()
    model.save_pretrained(tmp_path)
    x = torch.randint(0, 64, (2, 7))
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model.eval()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=1e-6, atol=1e-6)


def test_rank_pattern_keys_with_adapter_name_are_accepted(tmp_path):
    base = tiny_llama(seed=0)
    model = trained_with_a_rank0_layer(copy.deepcopy(base))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["rank_pattern"] = {f"{k}.default": v for k, v in cfg["rank_pattern"].items()}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    os.unlink(tmp_path / STATE_NAME)
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.rank_pattern == model.rank_pattern


def test_saving_without_total_step_warns(tmp_path):
    model = checkpoint_model(tiny_llama(), total_step=None)
    with pytest.warns(UserWarning, match="total_step=None"):
        model.save_pretrained(tmp_path)
