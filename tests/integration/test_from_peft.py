"""af.from_peft: a live PEFT AdaLoRA model converted at any point of training goes on exactly as PEFT
would (same Parameters and optimizer, rank pattern, importance EMAs); pruned and inference-mode PEFT
models, GPT-2 (Conv1D) bases and rank-0 modules convert with equal outputs; bad input is refused
before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch

import adalora_fast as af
from adalora_fast.testing import max_rel_err
from tests.helpers import (
    LLAMA_PROJ,
    batches,
    fix_pattern_with_module_at_rank_zero,
    logits,
    peft_adalora,
    peft_pattern,
    tiny_gpt2,
    tiny_llama,
    train_peft,
    train_side_by_side,
)

peft = pytest.importorskip("peft")

SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=20)
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.mark.parametrize("convert_at", [0, 7, 18], ids=["fresh", "budget-phase", "final-phase"])
def test_conversion_continues_peft_training_exactly(convert_at):
    pm = peft_adalora(tiny_llama(2), LLAMA_PROJ, task_type="CAUSAL_LM", orth_reg_weight=0.5, **SCHEDULE)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    train_peft(pm, opt, range(convert_at))
    if convert_at == 7:
        assert peft_pattern(pm) is not None and pm.base_model.rankallocator.exp_avg_ipt
    pm_ref, opt_ref = copy.deepcopy((pm, opt))
    params = {
        name: {k: getattr(m, k)["default"] for k in ("lora_A", "lora_E", "lora_B")}
        for name, m in pm.base_model.model.named_modules()
        if hasattr(m, "lora_E")
    }

    ours = af.from_peft(pm)
    assert ours.training and ours.is_trainable
    assert sorted(ours.adapted_names) == sorted(params)
    for name, layer in ours.adapted_layers:
        for k, p in params[name].items():
            assert getattr(layer, k) is p, "the PEFT Parameters (and the optimizer's state) are kept"
    assert sorted(ours.adalora_config.target_modules) == sorted(LLAMA_PROJ)

    data = batches(SCHEDULE["total_step"] + 2)
    train_side_by_side(pm_ref, ours, opt_ref, opt, data, range(convert_at, len(data)))
    kept = sum(sum(p) for p in ours.rank_pattern.values())
    assert kept == SCHEDULE["target_r"] * len(ours.adapted_names)
    ref_layers = dict(pm_ref.base_model.model.named_modules())
    for name, layer in ours.adapted_layers:
        for k in ("lora_A", "lora_E", "lora_B"):
            want = getattr(ref_layers[name], k)["default"]  # may be all zero: a module at rank 0
            torch.testing.assert_close(getattr(layer, k), want, rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")


def _pruned_gpt2_peft(tmp_path):
    """A GPT-2 PEFT AdaLoRA model trained to its final pattern with one module at rank 0, and the
    directory PEFT saved it to."""
    base = tiny_gpt2(2)
    pm = peft_adalora(
        copy.deepcopy(base), GPT2_TARGETS, task_type="CAUSAL_LM", fan_in_fan_out=True,
        init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
    )  # fmt: skip
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    train_peft(pm, opt, range(5))
    fix_pattern_with_module_at_rank_zero(pm, "transformer.h.0.attn.c_proj")
    pm.save_pretrained(tmp_path)
    return base, pm


def test_live_gpt2_with_a_rank0_module_converts_with_equal_outputs_and_saves_peft_checkpoint(tmp_path):
    base, pm = _pruned_gpt2_peft(tmp_path / "peft")
    pm.eval()
    x = batches(1, seed=5)[0]
    expected = logits(pm, x)
    pattern = peft_pattern(pm)
    ours = af.from_peft(pm)
    assert all(layer.fan_in_fan_out for _, layer in ours.adapted_layers)
    assert ours.rank_allocator.finalized and ours.rank_allocator.masked
    assert ours.rank_pattern == pattern
    assert ours.kept_ranks()["transformer.h.0.attn.c_proj"] == 0
    assert max_rel_err(logits(ours, x), expected) <= 1e-6
    assert max_rel_err(logits(base, x), expected) > 1e-4, "the adapter must matter"
    # Our checkpoint of the converted model is PEFT's checkpoint of the live one, tensor for tensor.
    from safetensors.torch import load_file

    ours.save_pretrained(tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert theirs.keys() == mine.keys()
    for key, t in theirs.items():
        assert torch.equal(mine[key], t), key


@pytest.mark.parametrize("is_trainable", [False, True])
def test_peft_model_loaded_pruned_converts_like_our_loader(tmp_path, is_trainable):
    base, _ = _pruned_gpt2_peft(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=is_trainable).eval()
    x = batches(1, seed=5)[0]
    expected = logits(loaded, x)
    ours = af.from_peft(loaded)
    direct = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=is_trainable).eval()
    assert ours.is_trainable == is_trainable == (ours.rank_allocator is not None)
    assert not ours.training
    assert ours.rank_pattern == direct.rank_pattern
    assert {n: m.r for n, m in ours.adapted_layers} == {n: m.r for n, m in direct.adapted_layers}
    assert ours.model.get_submodule("transformer.h.0.attn.c_proj").r == 0
    assert max_rel_err(logits(ours, x), expected) <= 1e-6
    assert max_rel_err(logits(direct, x), expected) <= 1e-6
    assert all(p.requires_grad == is_trainable for n, p in ours.named_parameters() if "lora_" in n)


def test_not_a_peft_adalora_model_is_refused():
    lora = peft.get_peft_model(tiny_llama(1), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="PEFT AdaLoRA model.*LoraModel"):
        af.from_peft(lora)
    with pytest.raises(TypeError, match="PEFT AdaLoRA model"):
        af.from_peft(tiny_llama(1))


def test_merged_peft_model_is_refused_and_left_as_it_was():
    pm = peft_adalora(tiny_llama(1), ["q_proj", "v_proj"], total_step=10)
    x = batches(1)[0]
    before = logits(pm, x)
    pm.merge_adapter()
    with pytest.raises(ValueError, match=r"q_proj'.*merged.*unmerge_adapter"):
        af.from_peft(pm)
    pm.unmerge_adapter()
    assert max_rel_err(logits(pm, x), before) <= 1e-6
    assert af.from_peft(pm) is not None  # and it converts once unmerged


def test_unknown_adapter_name_is_refused():
    pm = peft_adalora(tiny_llama(1), ["q_proj"], total_step=10)
    with pytest.raises(ValueError, match="adapter_name='other'.*default"):
        af.from_peft(pm, adapter_name="other")


def test_layers_to_transform_is_kept_as_peft_wrote_it():
    pm = peft_adalora(tiny_llama(2), ["q_proj"], total_step=10, layers_to_transform=[1])
    names = [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_E")]
    assert names == ["model.layers.1.self_attn.q_proj"]
    ours = af.from_peft(pm)
    assert ours.adapted_names == names
    assert ours.adalora_config.target_modules == ["q_proj"]
    assert ours.adalora_config.layers_to_transform == [1]


def test_explicit_targets_when_peft_s_modules_changed_after_its_config():
    pm = peft_adalora(tiny_llama(2), ["q_proj", "v_proj"], total_step=10)
    pm.base_model.model.model.layers[0].self_attn.v_proj = pm.base_model.model.model.layers[
        0
    ].self_attn.v_proj.base_layer
    names = [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_E")]
    assert "model.layers.0.self_attn.v_proj" not in names
    ours = af.from_peft(pm)
    assert ours.adapted_names == names
    assert ours.adalora_config.target_modules == names


def test_other_adapters_are_dropped_and_the_chosen_one_matches_peft():
    base = tiny_llama(1)
    pm = peft_adalora(copy.deepcopy(base), ["q_proj", "v_proj"], total_step=10)
    second = peft.AdaLoraConfig(target_modules=["o_proj"], total_step=10, inference_mode=True)
    pm.add_adapter("second", second)  # PEFT allows one trainable AdaLoRA adapter
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E.second" in n:
                p.normal_(0, 0.5)
    pm.set_adapter("second")
    x = batches(1)[0]
    expected = logits(pm, x)
    ours = af.from_peft(pm, adapter_name="second")
    from peft.tuners.adalora.layer import AdaLoraLayer

    assert not any(isinstance(m, AdaLoraLayer) for m in ours.modules())
    assert ours.adapted_names == ["model.layers.0.self_attn.o_proj"]
    assert max_rel_err(logits(ours, x), expected) <= 1e-6
    assert max_rel_err(logits(base, x), expected) > 1e-4, "the adapter must matter"


def test_adapter_that_trains_biases_is_refused():
    pm = peft_adalora(tiny_llama(1), ["q_proj"], total_step=10, bias="all")
    with pytest.raises(ValueError, match="bias='all'"):
        af.from_peft(pm)
