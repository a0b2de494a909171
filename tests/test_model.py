"""model.py: AdaLoraModel's behaviour as a whole.

Merging: merge() / unmerge() / merge_and_unload() on Llama- and GPT-2-style models after real training
with pruning (some layers at rank 0): merged outputs equal the adapter path, unmerge() restores the
weights bit for bit (fp32 and bf16), the sum is fp32 cast once, errors and warnings. The orthogonal
regulariser wired into the model: model.orth_regularization() against the float64 reference, and the
loss with the weighted regulariser (dict and tuple outputs, GPT-2, weight 0, no labels).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adalora_fast as af
from adalora_fast import SVDLinear, reference
from adalora_fast.testing import max_rel_err
from tests.helpers import (
    LLAMA_PROJ,
    TRAINED_SCHEDULE,
    batches,
    checkpoint_model,
    float64_value_and_grads,
    logits,
    tiny_gpt2,
    tiny_llama,
    trained_model,
)


# ---- merging ------------------------------------------------------------------------------------------
def _weights(model: af.AdaLoraModel) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in model.adapted_layers}


@pytest.fixture(scope="module")
def llama_trained():
    return trained_model(tiny_llama(2), LLAMA_PROJ)


@pytest.fixture(scope="module")
def gpt2_trained():
    return trained_model(tiny_gpt2(2), ["c_attn", "c_proj", "c_fc"])


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_merge_matches_adapter_path_and_unmerge_is_bitwise(which, llama_trained, gpt2_trained):
    model = copy.deepcopy(llama_trained if which == "llama" else gpt2_trained).eval()
    x = batches(1, seed=77)[0]
    with torch.no_grad():
        expected = model(input_ids=x).logits
    before = _weights(model)
    model.merge()
    assert model.merged and all(layer.merged for _, layer in model.adapted_layers)
    with torch.no_grad():
        merged = model(input_ids=x).logits
    assert max_rel_err(merged, expected) <= 1e-5
    for name, layer in model.adapted_layers:  # the sum is fp32, cast once
        delta = layer.get_delta_weight().float()
        assert torch.equal(layer.base_layer.weight, (before[name].float() + delta).to(before[name].dtype))
    model.unmerge()
    assert not model.merged
    for name, layer in model.adapted_layers:
        assert torch.equal(layer.base_layer.weight, before[name]), name
        assert "unmerged_weight" not in dict(layer.named_buffers())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, expected)


def test_unmerge_is_bitwise_for_bf16_weights(llama_trained):
    model = copy.deepcopy(llama_trained)
    for _, layer in model.adapted_layers:
        layer.base_layer.to(torch.bfloat16)
    before = _weights(model)
    model.merge()
    changed = sum(not torch.equal(layer.base_layer.weight, before[n]) for n, layer in model.adapted_layers)
    assert changed > 0, "merging should change some bf16 weights"
    model.unmerge()
    for name, layer in model.adapted_layers:
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.base_layer.weight, before[name]), name


def test_merge_without_exact_unmerge_keeps_nothing_and_restores_to_rounding(llama_trained):
    model = copy.deepcopy(llama_trained)
    before = _weights(model)
    model.merge(exact_unmerge=False)
    assert all("unmerged_weight" not in dict(layer.named_buffers()) for _, layer in model.adapted_layers)
    model.unmerge()
    for name, layer in model.adapted_layers:
        w, ref = layer.base_layer.weight.double(), before[name].double()
        scale = ref.abs().max() + layer.get_delta_weight().double().abs().max()
        assert (w - ref).abs().max() <= 2 * torch.finfo(torch.float32).eps * scale, name


def test_saved_original_weights_are_not_in_the_state_dict_and_move_with_the_model(llama_trained):
    model = copy.deepcopy(llama_trained)
    keys = set(model.model.state_dict())
    model.merge()
    assert set(model.model.state_dict()) == keys
    model.model.to(torch.float64)
    layer = model.adapted_layers[0][1]
    assert layer.unmerged_weight.dtype == torch.float64


def test_merge_and_unload_after_merge_does_not_merge_twice(llama_trained):
    x = batches(1, seed=5)[0]
    once = copy.deepcopy(llama_trained).merge_and_unload()
    model = copy.deepcopy(llama_trained)
    model.merge()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, SVDLinear) for m in plain.modules())
    for (n1, p1), (n2, p2) in zip(once.named_parameters(), plain.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        assert torch.equal(once(input_ids=x).logits, plain(input_ids=x).logits)


def test_double_merge_and_unmerge_warn_and_do_nothing(llama_trained):
    layer = copy.deepcopy(llama_trained.adapted_layers[1][1])
    w = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    layer.merge()
    merged_w = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_w)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w)


def test_merged_model_gets_no_adapter_gradients_and_the_allocator_says_so():
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **TRAINED_SCHEDULE)
    model = af.get_adalora_model(tiny_llama(1), cfg)
    model.merge()
    x = batches(1, seed=3)[0]
    model(input_ids=x, labels=x).loss.backward()
    # only the orthogonal regulariser (in the loss) reaches A and B; nothing reaches lambda
    assert all(layer.lora_E.grad is None for _, layer in model.adapted_layers)
    with pytest.raises(RuntimeError, match="lora_E has no gradient"):
        model.update_and_allocate(0)  # a scoring step


def test_merge_and_unload_matches_adapter_path():
    model = checkpoint_model(tiny_llama())
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.normal_()
    model.eval()
    x = batches(1, seed=3)[0]
    expected = logits(model, x)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SVDLinear) for m in merged.modules())
    assert isinstance(merged.get_submodule("model.layers.0.self_attn.q_proj"), nn.Linear)
    torch.testing.assert_close(merged(input_ids=x).logits.detach(), expected, rtol=1e-5, atol=1e-5)


# ---- the orthogonal regulariser in the model and its loss ----------------------------------------
def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=g))
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)


def test_model_orth_regularization_matches_reference():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig())
    _randomise(model, 7)
    layers = [m for _, m in model.adapted_layers]
    As, Bs = [m.lora_A for m in layers], [m.lora_B for m in layers]
    got = model.orth_regularization()
    assert max_rel_err(got, reference.orth_regularization(As, Bs)) <= 1e-6
    expected64, ref_grads = float64_value_and_grads(As, Bs)
    assert max_rel_err(got, expected64) <= 1e-6
    got.backward()
    for p, exp in zip(As + Bs, ref_grads, strict=True):
        assert max_rel_err(p.grad, exp) <= 1e-5


@pytest.mark.parametrize("weight", [0.5, 0.1, 2.0])
def test_loss_includes_weighted_regulariser(weight):
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(orth_reg_weight=weight))
    _randomise(model, 8)
    torch.manual_seed(9)
    ids = torch.randint(0, 64, (2, 9))
    base_loss = model.model(input_ids=ids, labels=ids).loss
    reg = reference.orth_regularization(
        [m.lora_A for _, m in model.adapted_layers], [m.lora_B for _, m in model.adapted_layers]
    )
    assert reg.item() > 0.1
    expected = base_loss + weight * reg
    out = model(input_ids=ids, labels=ids)
    assert abs(out.loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    # the loss gradient includes the regulariser's
    out.loss.backward()
    assert all(m.lora_A.grad is not None for _, m in model.adapted_layers)


def test_tuple_outputs_get_the_regulariser():
    weight = 0.5
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(orth_reg_weight=weight))
    _randomise(model, 10)
    ids = torch.randint(0, 64, (2, 9))
    base_loss = model.model(input_ids=ids, labels=ids).loss
    expected = base_loss + weight * model.orth_regularization()
    out = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple)
    assert abs(out[0].item() - expected.item()) <= 1e-6 * abs(expected.item())
    # the logits are untouched
    assert torch.equal(out[1], model(input_ids=ids).logits)


def test_gpt2_loss_includes_regulariser():
    model = af.get_adalora_model(tiny_gpt2(), af.AdaLoraConfig())
    _randomise(model, 11)
    ids = torch.randint(0, 64, (2, 9))
    expected = model.model(input_ids=ids, labels=ids).loss + 0.5 * model.orth_regularization()
    got = model(input_ids=ids, labels=ids).loss
    assert abs(got.item() - expected.item()) <= 1e-6 * abs(expected.item())


def test_zero_weight_leaves_loss_unchanged():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(orth_reg_weight=0.0))
    _randomise(model, 12)
    ids = torch.randint(0, 64, (2, 9))
    base_loss = model.model(input_ids=ids, labels=ids).loss
    assert torch.equal(model(input_ids=ids, labels=ids).loss, base_loss)
    assert torch.equal(model(input_ids=ids, labels=ids, return_dict=False)[0], base_loss)


def test_no_labels_no_loss():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig())
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids)
    assert out.loss is None
    out_t = model(input_ids=ids, return_dict=False)
    assert torch.equal(out_t[0], out.logits)


# ---- load_adapter: a checkpoint of this model's adapter, in place ---------------------------------------
def _train(model: af.AdaLoraModel, steps: range, seed: int = 1) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, x in zip(steps, batches(len(steps), seed=seed), strict=True):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()


def _state(model: af.AdaLoraModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_adapter_restores_weights_masks_and_scores_into_the_same_parameters(tmp_path):
    torch.manual_seed(0)
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **TRAINED_SCHEDULE)
    model = af.get_adalora_model(tiny_llama(2), cfg)
    _train(model, range(5))  # in the budget phase: scores and masks matter
    model.save_pretrained(tmp_path)
    saved, alloc_state = _state(model), copy.deepcopy(model.rank_allocator.state_dict())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _train(model, range(5, 8), seed=2)
    assert any(not torch.equal(saved[k], v) for k, v in _state(model).items())
    model.load_adapter(tmp_path, is_trainable=True)
    assert {n: p for n, p in model.named_parameters() if p.requires_grad} == params  # same objects
    for k, v in _state(model).items():
        assert torch.equal(v, saved[k]), k
    got = model.rank_allocator.state_dict()
    assert {k: got[k] for k in ("last_step", "budget", "masked")} == {
        k: alloc_state[k] for k in ("last_step", "budget", "masked")
    }
    for k, v in alloc_state["scores"].items():
        assert torch.equal(got["scores"][k], v), k


def test_load_adapter_refusals_change_nothing(tmp_path):
    torch.manual_seed(0)
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **TRAINED_SCHEDULE)
    model = af.get_adalora_model(tiny_llama(2), cfg)
    _train(model, range(12))
    model.save_pretrained(tmp_path / "ok")
    before = _state(model)
    with pytest.raises(ValueError, match="holds one adapter"):
        model.load_adapter(tmp_path / "ok", adapter_name="other")
    with pytest.raises(ValueError, match="is_trainable=False"):
        model.load_adapter(tmp_path / "ok", is_trainable=False)
    q_only = af.AdaLoraConfig(target_modules=["q_proj"], **TRAINED_SCHEDULE)
    other = af.get_adalora_model(tiny_llama(2), q_only)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="is not an adapted module|no weights for module"):
        model.load_adapter(tmp_path / "other")
    compacted = copy.deepcopy(model)
    compacted.compact()
    compacted.save_pretrained(tmp_path / "compacted")
    with pytest.raises(ValueError, match="another rank pattern"):
        model.load_adapter(tmp_path / "compacted")
    for k, v in _state(model).items():
        assert torch.equal(v, before[k]), k


def test_load_adapter_without_training_state_spreads_the_kept_ranks(tmp_path):
    torch.manual_seed(0)
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **TRAINED_SCHEDULE)
    model = af.get_adalora_model(tiny_llama(2), cfg)
    _train(model, range(12))
    model.save_pretrained(tmp_path)
    (tmp_path / "adalora_training_state.safetensors").unlink()  # a PEFT-written folder, say
    fresh = af.get_adalora_model(tiny_llama(2), copy.deepcopy(cfg))
    fresh.load_adapter(tmp_path)
    assert fresh.rank_pattern == model.rank_pattern
    x = batches(1, seed=7)[0]
    torch.testing.assert_close(logits(fresh.eval(), x), logits(model.eval(), x), rtol=1e-6, atol=1e-6)
