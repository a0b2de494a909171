"""reference.budget_schedule vs PEFT's RankAllocator.budget_schedule, and the phase edges."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from _models import LLAMA_PROJ, tiny_llama

from adalora_fast import reference

peft = pytest.importorskip("peft")
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator  # noqa: E402

# (tinit, tfinal, total_step, deltaT, init_bgt, target_bgt)
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
    total_step = combo[2]
    for step in range(total_step + 4):
        got = ours(step, *combo)
        expected = peft_schedule(step, *combo)
        assert got == expected, step
        assert type(got[0]) is int and type(got[1]) is bool, step


def test_matches_a_real_peft_allocator():
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
