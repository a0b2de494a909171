"""accelerate: ``prepare``, ``backward``, and ``save_state`` / ``load_state`` (safetensors by default, and
pickle) with the allocator registered for checkpointing: a resumed run equals an uninterrupted one
bitwise, into a fresh model or back into the live one (whose λ are views into the allocator's buffer)."""

from __future__ import annotations

import copy

import pytest
import torch

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, tiny_llama

accelerate = pytest.importorskip("accelerate")

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=12)
DATA = batches(12, seed=1)


def _initial() -> af.AdaLoraModel:
    torch.manual_seed(0)
    return af.get_adalora_model(tiny_llama(2), af.AdaLoraConfig(target_modules=LLAMA_PROJ, **SCHEDULE))


def _prepare(model: af.AdaLoraModel):
    acc = accelerate.Accelerator(cpu=True)
    acc.register_for_checkpointing(model.rank_allocator)  # masks, scores, flags
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, opt = acc.prepare(model, opt)
    return acc, prepared, opt


def _train(acc, model, opt, steps) -> None:
    for step in steps:
        x = DATA[step]
        acc.backward(model(input_ids=x, labels=x).loss)
        opt.step()
        af.update_and_allocate(model, step, opt)
        opt.zero_grad()


def _assert_same(a: af.AdaLoraModel, b: af.AdaLoraModel) -> None:
    assert a.rank_pattern == b.rank_pattern
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    scores_a, scores_b = a.rank_allocator.state_dict()["scores"], b.rank_allocator.state_dict()["scores"]
    assert scores_a.keys() == scores_b.keys()


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_state_load_state_resumes_exactly(tmp_path, safe_serialization):
    init = _initial()
    acc, whole, opt = _prepare(copy.deepcopy(init))
    _train(acc, whole, opt, range(12))

    acc, model, opt = _prepare(copy.deepcopy(init))
    _train(acc, model, opt, range(5))  # in the budget phase: the scores decide the next masks
    acc.save_state(str(tmp_path), safe_serialization=safe_serialization)
    _train(acc, model, opt, range(5, 8))  # then back into the live model
    acc.load_state(str(tmp_path))
    _train(acc, model, opt, range(5, 12))
    _assert_same(af.unwrap_model(model), af.unwrap_model(whole))

    acc, fresh, opt = _prepare(copy.deepcopy(init))  # a new process, say
    acc.load_state(str(tmp_path))
    _train(acc, fresh, opt, range(5, 12))
    _assert_same(af.unwrap_model(fresh), af.unwrap_model(whole))
