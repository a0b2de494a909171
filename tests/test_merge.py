"""Merging: merge() / unmerge() / merge_and_unload() on Llama- and GPT-2-style models after real
training with pruning (some layers at rank 0): merged outputs equal the adapter path, unmerge()
restores the weights bit for bit (fp32 and bf16), the sum is fp32 cast once, errors and warnings."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import max_rel_err
from conftest import LLAMA_PROJ, batches, tiny_gpt2, tiny_llama
from torch import nn

import adalora_fast as af
from adalora_fast import SVDLinear

SCHEDULE = {"init_r": 4, "target_r": 1, "tinit": 2, "tfinal": 3, "deltaT": 1, "total_step": 12}


def _trained(base: nn.Module, targets: list[str], seed: int = 0) -> af.AdaLoraModel:
    """A model trained through the whole schedule (mask steps, final pattern), one layer forced to rank 0."""
    torch.manual_seed(seed)
    cfg = af.AdaLoraConfig(target_modules=targets, backend="torch", lora_dropout=0.0, **SCHEDULE)
    model = af.get_adalora_model(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = batches(SCHEDULE["total_step"], seed=seed + 1)
    for step, x in enumerate(data):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    with torch.no_grad():  # one layer pruned to rank 0 (as a budget can leave it)
        first = model.adapted_layers[0][1]
        first.lora_E.zero_()
    kept = model.kept_ranks()
    assert min(kept.values()) < SCHEDULE["init_r"], "the schedule should have pruned something"
    return model


def _weights(model: af.AdaLoraModel) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in model.adapted_layers}


@pytest.fixture(scope="module")
def llama_trained():
    return _trained(tiny_llama(2), LLAMA_PROJ)


@pytest.fixture(scope="module")
def gpt2_trained():
    return _trained(tiny_gpt2(2), ["c_attn", "c_proj", "c_fc"])


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
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **SCHEDULE)
    model = af.get_adalora_model(tiny_llama(1), cfg)
    model.merge()
    x = batches(1, seed=3)[0]
    model(input_ids=x, labels=x).loss.backward()
    # only the orthogonal regulariser (in the loss) reaches A and B; nothing reaches lambda
    assert all(layer.lora_E.grad is None for _, layer in model.adapted_layers)
    with pytest.raises(RuntimeError, match="lora_E has no gradient"):
        model.update_and_allocate(0)  # a scoring step
