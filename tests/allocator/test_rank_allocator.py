"""allocator/rank_allocator.py: RankAllocator's schedule (reference.budget_schedule against PEFT's
RankAllocator.budget_schedule, the phase edges, the cubic), the phases and budgets of a run, errors, the
update's op count independent of depth, the scorer backend, and steps with non-finite gradients (a mask
step masks with the previous scores; the counter counts scoring steps only)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adalora_fast import reference
from adalora_fast.allocator import RankAllocator, ReferenceScorer
from tests.helpers import (
    HOST_SYNC_OPS,
    LLAMA_PROJ,
    SCORER_BACKENDS,
    VIEW_OPS,
    allocator_model,
    allocator_state,
    assert_same_state,
    aten_ops,
    draw_grads,
    poisoned,
    random_grads,
    run_scored_steps,
    scored_model,
    set_grads,
    tiny_llama,
)

# ---- the schedule: reference.budget_schedule vs PEFT's RankAllocator.budget_schedule, phase edges -------
COMBOS = [
    (0, 0, 10, 1, 84, 56),
    (2, 3, 20, 2, 84, 56),
    (5, 5, 30, 3, 168, 0),
    (0, 4, 12, 5, 24, 8),
    (3, 0, 7, 1, 12, 12),
    (1, 1, 3, 1, 96, 32),
    (0, 0, 1, 1, 12, 4),
    (10, 20, 200, 7, 1000, 17),
    (0, 99, 100, 4, 60, 30),
]


def peft_schedule(step, tinit, tfinal, total_step, deltaT, init_bgt, target_bgt):
    from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

    stub = SimpleNamespace(
        peft_config=SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=deltaT),
        init_bgt=init_bgt,
        target_bgt=target_bgt,
    )
    return PeftRankAllocator.budget_schedule(stub, step)


def ours(step, tinit, tfinal, total_step, deltaT, init_bgt, target_bgt):
    return reference.budget_schedule(
        step,
        init_bgt=init_bgt,
        target_bgt=target_bgt,
        tinit=tinit,
        tfinal=tfinal,
        total_step=total_step,
        deltaT=deltaT,
    )


@pytest.mark.parametrize("combo", COMBOS, ids=[str(c) for c in COMBOS])
def test_matches_peft_every_step(combo):
    pytest.importorskip("peft")
    total_step = combo[2]
    for step in range(total_step + 4):
        got = ours(step, *combo)
        expected = peft_schedule(step, *combo)
        assert got == expected, step
        assert type(got[0]) is int and type(got[1]) is bool, step


def test_matches_a_real_peft_allocator():
    peft = pytest.importorskip("peft")
    init_r, target_r, tinit, tfinal, total_step, deltaT = 6, 2, 2, 3, 25, 2
    cfg = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        total_step=total_step,
        deltaT=deltaT,
        target_modules=LLAMA_PROJ,
    )
    pm = peft.get_peft_model(tiny_llama(), cfg)
    allocator = pm.base_model.rankallocator
    n_layers = 14
    assert (allocator.init_bgt, allocator.target_bgt) == (init_r * n_layers, target_r * n_layers)
    for step in range(total_step + 4):
        expected = allocator.budget_schedule(step)
        got = ours(step, tinit, tfinal, total_step, deltaT, init_r * n_layers, target_r * n_layers)
        assert got == expected, step


@pytest.mark.parametrize("combo", COMBOS, ids=[str(c) for c in COMBOS])
def test_phase_edges(combo):
    tinit, tfinal, total_step, deltaT, init_bgt, target_bgt = combo
    for step in range(total_step + 4):
        budget, mask = ours(step, *combo)
        if step <= tinit:
            assert (budget, mask) == (init_bgt, False), step
        elif step > total_step - tfinal:
            assert (budget, mask) == (target_bgt, True), step
        else:
            assert target_bgt <= budget <= init_bgt, step
            assert mask == (step % deltaT == 0), step
    # the last budgeting step lands exactly on the target
    assert ours(total_step - tfinal, *combo)[0] == target_bgt
    # the budget never increases
    budgets = [ours(s, *combo)[0] for s in range(total_step + 4)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))


def test_cubic_values():
    # init 100, target 20, tinit 0, tfinal 0, T 10: budget = int(80 * (1 - s/10)**3 + 20)
    for step in range(1, 11):
        expected = int(80 * (1 - step / 10) ** 3 + 20)
        assert ours(step, 0, 0, 10, 1, 100, 20) == (expected, True)
    assert ours(5, 0, 0, 10, 1, 100, 20) == (30, True)
    assert ours(5, 0, 0, 10, 2, 100, 20) == (30, False)


# ---- phases and budgets of a run, errors, the scorer backend ----------------------------------------
def _train_steps(model, steps, gen):
    for step in steps:
        random_grads(model, gen)
        yield step, model.update_and_allocate(step)


def test_phases_and_budgets():
    cfg = {"init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 4, "deltaT": 2, "total_step": 20}
    model = allocator_model(**cfg)
    alloc = model.rank_allocator
    gen = torch.Generator().manual_seed(0)
    m = len(model.adapted_names)
    for step, budget in _train_steps(model, range(25), gen):
        expected, mask = alloc.schedule(step)
        kept = sum(sum(p) for p in model.rank_pattern.values())
        if step <= cfg["tinit"]:
            assert budget == 4 * m and not alloc.masked
            assert kept == 4 * m
        elif step < 16:
            assert budget == expected
            if mask:
                assert kept == budget
        if step >= 16:
            assert budget == 2 * m and kept == 2 * m and alloc.finalized
            assert not alloc.scorer.has_scores  # EMA state freed at the final step
        if step == 16:
            final = model.rank_pattern
        if step > 16:
            assert model.rank_pattern == final
            for name, layer in model.adapted_layers:  # masked singular values stay zero
                dead = ~torch.tensor(final[name])
                assert torch.all(layer.lora_E[dead] == 0)
        # Revive masked entries as an optimizer would; the next step must re-mask them after final.
        with torch.no_grad():
            for _, layer in model.adapted_layers:
                layer.lora_E.add_(0.01)


def test_total_step_none_raises():
    model = allocator_model(total_step=None)
    with pytest.raises(ValueError, match="total_step"):
        model.update_and_allocate(0)
    model.set_total_step(10)
    random_grads(model, torch.Generator().manual_seed(0))
    model.update_and_allocate(0)


def test_missing_gradient_names_module():
    model = allocator_model()
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A has no gradient"):
        model.update_and_allocate(0)


def test_reference_backend_can_be_forced():
    model = allocator_model()
    alloc = RankAllocator(model.adapted_layers, model.adalora_config, backend="reference")
    assert isinstance(alloc.scorer, ReferenceScorer)


# ---- op counts ------------------------------------------------------------------------------------
def _poison_grads(model):
    """inf in the first layer's A gradient, NaN in the last layer's B gradient."""
    layers = [m for _, m in model.adapted_layers]
    layers[0].lora_A.grad[0, 1] = float("inf")
    layers[-1].lora_B.grad[2, 0] = float("nan")


@pytest.mark.parametrize("step", [1, 10, 31, 40, 45], ids=["warmup", "mask", "no-mask", "final", "after"])
def test_update_and_allocate_op_count_independent_of_depth(step):
    """Same compute ops for 2 and 8 layers, and for finite and non-finite gradients (the skip is a
    device-side select, not a branch); no host sync either way."""
    cfg = {"tinit": 5, "tfinal": 10, "total_step": 50, "deltaT": 2}
    counts = {}
    for layers in (2, 8):
        for nonfinite in (False, True):
            # Large enough that CPU torch.cat takes its parallel (per-input view) path at 8 layers.
            model = allocator_model(layers, hidden=128, intermediate=256, init_r=12, target_r=4, **cfg)
            gen = torch.Generator().manual_seed(0)
            # Earlier steps: scores exist (their one-time allocation is not part of a steady-state step).
            for s in sorted(x for x in {0, 6, step - 1} if x < step):
                random_grads(model, gen)
                model.update_and_allocate(s)
            random_grads(model, gen)
            if nonfinite:
                _poison_grads(model)
            ops = aten_ops(lambda m=model: m.update_and_allocate(step))
            assert not HOST_SYNC_OPS & set(ops), ops
            counts[layers, nonfinite] = sum(v for k, v in ops.items() if k not in VIEW_OPS)
            if nonfinite and step < 40:
                assert int(model.rank_allocator.nonfinite_steps) == 1
    assert len(set(counts.values())) == 1, counts


# ---- non-finite gradients (fp16 steps that GradScaler skips) ---------------------------------------
@pytest.mark.parametrize("backend", SCORER_BACKENDS)
def test_nonfinite_mask_step_masks_with_previous_scores(backend):
    model = scored_model(backend)
    gen = torch.Generator().manual_seed(2)
    run_scored_steps(model, range(9), gen)
    twin = copy.deepcopy(model)

    set_grads(model, poisoned(model, draw_grads(model, gen), "lora_B", float("nan")))
    budget = model.update_and_allocate(9)  # a mask step
    assert budget < model.rank_allocator.init_bgt
    # The twin masks at the same budget from its (previous) scores, without any score update.
    twin.rank_allocator.scorer.mask_to_budget(budget)
    assert_same_state(allocator_state(model), allocator_state(twin))
    assert sum(sum(p) for p in model.rank_pattern.values()) == budget
    assert model.nonfinite_score_steps() == 1


@pytest.mark.parametrize("backend", SCORER_BACKENDS)
def test_counter_counts_scoring_steps_only(backend):
    model = scored_model(backend)
    gen = torch.Generator().manual_seed(3)
    bad = {4, 5, 11, 34, 35, 37}  # 35 is the final step, 37 after it: no scores are updated there
    for step in range(38):
        grads = draw_grads(model, gen)
        if step in bad:
            grads = poisoned(model, grads, "lora_A", float("nan"))
        set_grads(model, grads)
        model.update_and_allocate(step)
    assert model.nonfinite_score_steps() == 4
    counter = model.rank_allocator.nonfinite_steps
    assert counter.dtype == torch.int64 and counter.shape == ()
    assert sum(sum(p) for p in model.rank_pattern.values()) == 2 * len(model.adapted_names)


# ---- step misuse ------------------------------------------------------------------------------------
STEP_MISUSE = [
    # (steps scored before, the bad step, error type, message)
    ([0, 1], 1, ValueError, "the last call scored step 1; steps must increase"),
    ([0, 1, 2], 1, ValueError, "the last call scored step 2"),
    ([0, 1, 2, 3, 4, 5, 6, 7, 36, 37], 10, ValueError, "the last call scored step 37"),  # past the final
    ([], -1, ValueError, "step must be >= 0"),
    ([0], 3.5, TypeError, "step must be an integer"),
    ([0], 3.0, TypeError, "step must be an integer"),
    ([0], True, TypeError, "step must be an integer"),
    ([0], "3", TypeError, "step must be an integer"),
    ([0], torch.tensor(3.0), TypeError, r"step must be an integer, got a \(\) torch.float32 tensor"),
    ([0], torch.tensor([3]), TypeError, r"got a \(1,\) torch.int64 tensor"),
]


@pytest.mark.parametrize(("before", "bad", "error", "message"), STEP_MISUSE)
def test_step_misuse_is_refused_and_changes_nothing(before, bad, error, message):
    model = scored_model("torch")
    gen = torch.Generator().manual_seed(0)
    run_scored_steps(model, before, gen)
    set_grads(model, draw_grads(model, gen))
    state, last = allocator_state(model), model.rank_allocator.last_step
    with pytest.raises(error, match=message):
        model.update_and_allocate(bad)
    assert_same_state(allocator_state(model), state)
    assert model.rank_allocator.last_step == last


@pytest.mark.parametrize(
    "step", [np.int64(3), np.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)]
)
def test_integer_steps_of_other_types_are_plain_ints(step, tmp_path):
    model = scored_model("torch")
    gen = torch.Generator().manual_seed(0)
    run_scored_steps(model, [0, 1], gen)
    set_grads(model, draw_grads(model, gen))
    model.update_and_allocate(step)
    assert type(model.rank_allocator.last_step) is int and model.rank_allocator.last_step == 3
    model.save_pretrained(tmp_path)  # the training state's JSON takes it


def test_reset_step_allows_going_back_on_purpose():
    model = scored_model("torch")
    gen = torch.Generator().manual_seed(0)
    run_scored_steps(model, [0, 1, 2], gen)
    model.rank_allocator.reset_step(0)
    run_scored_steps(model, [1], gen)
    with pytest.raises(ValueError, match="the last call scored step 1"):
        run_scored_steps(model, [1], gen)
    model.rank_allocator.reset_step()
    run_scored_steps(model, [0], gen)
    with pytest.raises(TypeError, match="reset_step: step must be an integer"):
        model.rank_allocator.reset_step(1.5)
