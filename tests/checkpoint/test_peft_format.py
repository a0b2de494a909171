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


# ---- checkpoints PEFT's ecosystem reads as its own ------------------------------------------------------
def test_saved_config_has_peft_s_full_key_set_and_inference_mode(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    ours = trained_model(base, ["q_proj", "v_proj"])
    ours.save_pretrained(tmp_path / "ours")
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=12)
    )
    pm.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert set(mine) == set(theirs)
    assert mine["inference_mode"] is True and theirs["inference_mode"] is True
    # the final pattern is in the live config too, as in PEFT's after its final mask step
    saved = {k: v for k, v in mine["rank_pattern"].items()}
    assert ours.adalora_config.rank_pattern == saved
    assert ours.adalora_config.inference_mode is False, "saving does not make the live model an inference one"
    card = (tmp_path / "ours" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card


def test_base_model_name_or_path_lets_auto_peft_model_load_our_folder(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    # PEFT's Auto classes need the task type (PEFT's own adapters without one fail the same way)
    cfg = af.AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj"], init_lora_weights=False, total_step=9
    )
    ours = af.get_adalora_model(base, cfg)
    ours.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    assert f'base_model: "{tmp_path / "base"}"' in (tmp_path / "adapter" / "README.md").read_text()
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    x = batches(1, seed=7)[0]
    ours.eval()
    torch.testing.assert_close(logits(auto, x), logits(ours, x), rtol=1e-5, atol=1e-6)


def test_bin_weights_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    ours = trained_model(base, ["q_proj", "v_proj"])
    ours.save_pretrained(tmp_path / "ours")  # safetensors first: the .bin save must replace it
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    assert (tmp_path / "ours" / "adapter_model.bin").is_file()
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists(), "a stale file would be read first"
    x = batches(1, seed=7)[0]
    ours.eval()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(pm, x), logits(ours, x), rtol=1e-5, atol=1e-6)
    resumed = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    assert resumed.rank_pattern == ours.rank_pattern
    assert resumed.rank_allocator.state_dict().keys() == ours.rank_allocator.state_dict().keys()
    # PEFT's legacy .bin loads in ours
    pm.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    again = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(again, x), logits(ours, x), rtol=1e-5, atol=1e-6)


def test_bin_weights_are_read_without_unpickling_code(tmp_path):
    base = tiny_llama(seed=0)
    ours = trained_model(base, ["q_proj"])
    ours.save_pretrained(tmp_path, safe_serialization=False)
    torch.save({"x": object()}, tmp_path / "adapter_model.bin")  # pickles an arbitrary object
    with pytest.raises(ValueError, match="adapter_model.bin: not a readable tensor file"):
        af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_save_and_load_take_peft_s_keyword_arguments(tmp_path):
    base = tiny_llama(seed=0)
    ours = trained_model(base, ["q_proj", "v_proj"])
    ours.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists(), "only the main process writes"
    ours.save_pretrained(tmp_path / "sel", selected_adapters=["default"], save_embedding_layers="auto")
    with pytest.raises(ValueError, match="selected_adapters"):
        ours.save_pretrained(tmp_path / "other", selected_adapters=["other"])
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        ours.save_pretrained(tmp_path / "pissa", path_initial_model_for_weight_conversion="x")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['colour'\\]"):
        ours.save_pretrained(tmp_path / "typo", colour="red")
    # state_dict=: the factors come from the given state dict (e.g. gathered by FSDP)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    name = ours.adapted_names[0]
    sd[f"model.{name}.lora_B"] += 1.0
    ours.save_pretrained(tmp_path / "sd", state_dict=sd)
    x = batches(1, seed=7)[0]
    loaded = af.AdaLoraModel.from_pretrained(
        copy.deepcopy(base),
        tmp_path / "sd",
        adapter_name="default",
        low_cpu_mem_usage=True,
        torch_device="cpu",
    )
    layer = loaded.model.get_submodule(name)
    keep = torch.tensor(ours.rank_pattern[name])
    torch.testing.assert_close(layer.lora_B, sd[f"model.{name}.lora_B"][:, keep])
    sel = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, subfolder="sel")
    ours.eval()
    torch.testing.assert_close(logits(sel, x), logits(ours, x), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "sel", colour="red")
    with pytest.raises(ValueError, match="key_mapping"):
        af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "sel", key_mapping={"a": "b"})


def test_from_pretrained_with_a_config_object_and_inference_mode(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    ours = trained_model(base, ["q_proj", "v_proj"])
    ours.save_pretrained(tmp_path)
    pcfg = peft.AdaLoraConfig.from_pretrained(tmp_path)
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, config=pcfg)
    assert loaded.adalora_config.inference_mode is True and loaded.rank_allocator is None
    trainable = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable.adalora_config.inference_mode is False and trainable.rank_allocator is not None


def test_saving_after_merge_and_unload_is_a_clear_error(tmp_path):
    base = tiny_llama(seed=0)
    ours = trained_model(base, ["q_proj"])
    ours.merge_and_unload()
    with pytest.raises(RuntimeError, match="no adapters any more"):
        ours.save_pretrained(tmp_path)
    assert not tmp_path.joinpath(CONFIG_NAME).exists()
