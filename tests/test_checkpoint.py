"""Checkpoints: PEFT's format both ways, exact resume, clear errors, atomic writes, merging."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from _models import max_rel_err
from conftest import LLAMA_PROJ, batches, tiny_gpt2, tiny_llama
from torch import nn

import adalora_fast as af
from adalora_fast.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME
from adalora_fast.layer import SVDLinear

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 5, "deltaT": 2, "total_step": 30}


def _train(model, opt, steps, data):
    for step in steps:
        x = data[step]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _new_model(base, **cfg):
    return af.get_adalora_model(base, af.AdaLoraConfig(target_modules=LLAMA_PROJ, **{**SCHEDULE, **cfg}))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_resume_is_bit_identical(tmp_path):
    data = batches(30)
    base = tiny_llama(seed=0)
    torch.manual_seed(5)
    ref = _new_model(copy.deepcopy(base), lora_dropout=0.0)
    resumed_init = copy.deepcopy(ref)
    opt = torch.optim.AdamW(_trainable(ref), lr=1e-2)
    _train(ref, opt, range(30), data)

    first = resumed_init
    opt1 = torch.optim.AdamW(_trainable(first), lr=1e-2)
    _train(first, opt1, range(15), data)
    first.save_pretrained(tmp_path / "ckpt")
    torch.save(opt1.state_dict(), tmp_path / "opt.pt")

    second = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ckpt", is_trainable=True)
    opt2 = torch.optim.AdamW(_trainable(second), lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    _train(second, opt2, range(15, 30), data)

    assert second.rank_pattern == ref.rank_pattern
    for (name, a), (_, b) in zip(ref.adapted_layers, second.adapted_layers, strict=True):
        assert a.lora_A.shape == b.lora_A.shape == (SCHEDULE["init_r"], a.in_features)
        for k in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(a, k), getattr(b, k)), f"{name}.{k}"


def _trained_with_a_rank0_layer(base):
    model = _new_model(base)
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    _train(model, opt, range(12), batches(12))
    # Force one layer to rank 0 (as the allocator may do) to exercise empty tensors.
    keep = model.rank_allocator.keep_mask()
    keep = {n: k.clone() for n, k in keep.items()}
    keep[model.adapted_names[1]][:] = False
    model.rank_allocator.scorer.set_keep(keep)
    model.rank_allocator.scorer.apply_keep()
    return model


def test_saved_checkpoint_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    ours = _trained_with_a_rank0_layer(copy.deepcopy(base))
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "ADALORA"
    pattern = cfg["rank_pattern"]
    assert set(pattern) == {f"{n}.lora_E" for n in ours.adapted_names}
    assert sum(pattern[f"{ours.adapted_names[1]}.lora_E"]) == 0
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = batches(1, seed=99)[0]
    ours.eval()
    torch.testing.assert_close(_logits(pm, x), _logits(ours, x), rtol=1e-5, atol=1e-6)

    # Reloading in adalora_fast for inference gives pruned shapes and the same outputs.
    again = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    layer = again.model.get_submodule(ours.adapted_names[1])
    assert layer.lora_A.shape == (0, layer.in_features)
    torch.testing.assert_close(_logits(again, x), _logits(ours, x), rtol=1e-5, atol=1e-6)
    assert again.rank_pattern == ours.rank_pattern


def test_peft_checkpoint_loads_pruned(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    torch.manual_seed(2)
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=LLAMA_PROJ, **SCHEDULE),
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
        torch.testing.assert_close(_logits(ours, x), _logits(reloaded, x), rtol=1e-5, atol=1e-6)
        saved = json.loads((tmp_path / CONFIG_NAME).read_text())["rank_pattern"]
        for name, layer in ours.adapted_layers:
            assert layer.r == sum(saved[f"{name}.lora_E"])
            assert layer.ranknum.item() == SCHEDULE["init_r"]
        assert ours.rank_pattern == {k[: -len(".lora_E")]: v for k, v in saved.items()}


def test_saved_gpt2_checkpoint_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    from test_merge import _trained

    base = tiny_gpt2(2)
    ours = _trained(base, ["c_attn", "c_proj", "c_fc"]).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    x = batches(1, seed=99)[0]
    assert max_rel_err(_logits(pm, x), _logits(ours, x)) <= 1e-5
    assert max_rel_err(_logits(base, x), _logits(ours, x)) > 1e-4, "the adapter must matter"


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
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=1e-6, atol=1e-6)


def _is_untouched(model: nn.Module) -> bool:
    return not any(isinstance(m, SVDLinear) for m in model.modules())


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        af.AdaLoraModel.from_pretrained(tiny_llama(), tmp_path)
    _new_model(tiny_llama()).save_pretrained(tmp_path)
    os.unlink(tmp_path / WEIGHTS_NAME)
    base = tiny_llama()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        af.AdaLoraModel.from_pretrained(base, tmp_path)
    assert _is_untouched(base)


def test_lora_checkpoint_is_rejected(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2))
    pm.save_pretrained(tmp_path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        af.AdaLoraModel.from_pretrained(base, tmp_path)
    assert _is_untouched(base)


def test_checkpoint_for_other_shapes_names_the_module(tmp_path):
    _new_model(tiny_llama()).save_pretrained(tmp_path)
    wider = tiny_llama(hidden=48, intermediate=64)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*lora_A has shape"):
        af.AdaLoraModel.from_pretrained(wider, tmp_path)
    assert _is_untouched(wider)
    deeper = tiny_llama(num_layers=3)
    with pytest.raises(ValueError, match=r"no weights for module 'model\.layers\.2\."):
        af.AdaLoraModel.from_pretrained(deeper, tmp_path)
    assert _is_untouched(deeper)


def test_checkpoint_for_other_architecture(tmp_path):
    model = af.get_adalora_model(tiny_gpt2(), af.AdaLoraConfig(init_r=2, target_r=1, total_step=5))
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="c_attn"):
        af.AdaLoraModel.from_pretrained(base, tmp_path)
    assert _is_untouched(base)


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = _new_model(tiny_llama())
    model.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, STATE_NAME])

    import adalora_fast.checkpoint.peft_format as peft_format

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_A.add_(1.0)
    monkeypatch.setattr(peft_format, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, STATE_NAME])


def test_merge_and_unload_matches_adapter_path():
    model = _new_model(tiny_llama())
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.normal_()
    model.eval()
    x = batches(1, seed=3)[0]
    expected = _logits(model, x)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SVDLinear) for m in merged.modules())
    assert isinstance(merged.get_submodule("model.layers.0.self_attn.q_proj"), nn.Linear)
    torch.testing.assert_close(merged(input_ids=x).logits.detach(), expected, rtol=1e-5, atol=1e-5)


def test_stale_training_state_is_never_used(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama(seed=0)
    model = _new_model(copy.deepcopy(base))
    model.save_pretrained(tmp_path)
    # Another tool rewrites the adapter weights: the old training state no longer belongs to them.
    weights = load_file(str(tmp_path / WEIGHTS_NAME))
    weights = {k: (torch.full_like(v, 0.5) if k.endswith("lora_E") else v) for k, v in weights.items()}
    save_file(weights, str(tmp_path / WEIGHTS_NAME))
    with pytest.warns(UserWarning, match="ignoring the training state"):
        loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    for _, layer in loaded.adapted_layers:
        assert torch.all(layer.lora_E == 0.5)
    # Saving an inference model into the directory removes the training state it cannot vouch for.
    af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path).save_pretrained(tmp_path)
    assert not (tmp_path / STATE_NAME).exists()


def test_corrupt_training_state_names_module_and_touches_nothing(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _new_model(tiny_llama())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / STATE_NAME), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(tmp_path / STATE_NAME))
    name = model.adapted_names[3]
    state[f"keep.{name}"] = torch.ones(SCHEDULE["init_r"] + 2, dtype=torch.uint8)
    save_file(state, str(tmp_path / STATE_NAME), metadata=metadata)
    base = tiny_llama()
    with pytest.raises(ValueError, match=f"keep mask of module '{name}'"):
        af.AdaLoraModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert _is_untouched(base)


def test_rank_pattern_keys_with_adapter_name_are_accepted(tmp_path):
    base = tiny_llama(seed=0)
    model = _trained_with_a_rank0_layer(copy.deepcopy(base))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["rank_pattern"] = {f"{k}.default": v for k, v in cfg["rank_pattern"].items()}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    os.unlink(tmp_path / STATE_NAME)
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.rank_pattern == model.rank_pattern


def test_saving_without_total_step_warns(tmp_path):
    model = _new_model(tiny_llama(), total_step=None)
    with pytest.warns(UserWarning, match="total_step=None"):
        model.save_pretrained(tmp_path)
