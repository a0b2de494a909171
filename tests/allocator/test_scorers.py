"""allocator/scorers.py: the vectorised flat scorer (backend "torch") against the per-layer reference
(bit-identical EMAs, scores, masks; state round trip; rebinding after a dtype change; non-finite scores
mask like PEFT), and non-finite gradients (fp16 steps that GradScaler skips): the score update of such a
step is skipped for the whole model, on the device, and counted, in both scorers."""

from __future__ import annotations

import copy

import pytest
import torch

from adalora_fast.allocator import FlatScorer, RankAllocator, ReferenceScorer
from tests.helpers import (
    KINDS,
    SCORER_BACKENDS,
    allocator_model,
    allocator_state,
    assert_same_state,
    draw_grads,
    kernel_devices,
    poisoned,
    random_grads,
    run_scored_steps,
    scored_model,
    set_grads,
)


def _score_both(m1, m2, flat, ref, gen):
    """One step of the same random gradients scored by both scorers (m2 gets copies of m1's)."""
    random_grads(m1, gen)
    for (_, a), (_, b) in zip(m1.adapted_layers, m2.adapted_layers, strict=True):
        for k in KINDS:
            getattr(b, k).grad = getattr(a, k).grad.clone()
    flat.update_scores()
    ref.update_scores()


def _twin_scorers():
    """Two identical models, one scored by the flat scorer, the other by the reference."""
    m1 = allocator_model()
    m2 = copy.deepcopy(m1)
    cfg = m1.adalora_config
    flat = FlatScorer(m1.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    ref = ReferenceScorer(m2.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    return m1, m2, flat, ref


def test_flat_scorer_matches_reference_exactly():
    m1, m2, flat, ref = _twin_scorers()
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        _score_both(m1, m2, flat, ref, gen)
        s_flat, s_ref = flat.layer_state(), ref.layer_state()
        assert s_flat.keys() == s_ref.keys()
        for key in s_ref:  # element-wise EMAs: same formulas, same order -> bit-identical
            assert torch.equal(s_flat[key], s_ref[key]), key
        scores_flat = flat.scores()
        scores_ref = ref.scores()
        for i, name in enumerate(flat.names):
            torch.testing.assert_close(scores_flat[i], scores_ref[name], rtol=1e-6, atol=0)
        budget = flat.init_bgt - 3 * (step + 1)
        flat.mask_to_budget(budget)
        ref.mask_to_budget(budget)
        for name, keep in flat.keep_by_layer().items():
            assert torch.equal(keep, ref.keep[name]), name
        for (_, a), (_, b) in zip(m1.adapted_layers, m2.adapted_layers, strict=True):
            assert torch.equal(a.lora_E, b.lora_E)
        kept = int(flat.keep.sum())
        assert kept == budget  # random scores have no ties: exactly `budget` triplets survive


def test_reference_state_roundtrips_into_flat():
    m1 = allocator_model()
    m2 = copy.deepcopy(m1)
    cfg = m1.adalora_config
    ref = ReferenceScorer(m1.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    gen = torch.Generator().manual_seed(3)
    random_grads(m1, gen)
    ref.update_scores()
    flat = FlatScorer(m2.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    flat.load_layer_state(ref.layer_state())
    for i, name in enumerate(flat.names):
        torch.testing.assert_close(flat.scores()[i], ref.scores()[name], rtol=1e-6, atol=0)


def test_rebinds_after_dtype_change():
    model = allocator_model()
    gen = torch.Generator().manual_seed(0)
    model.double()
    for _, layer in model.adapted_layers:
        for k in ("lora_A", "lora_E", "lora_B"):
            p = getattr(layer, k)
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    model.update_and_allocate(5)
    kept = sum(sum(p) for p in model.rank_pattern.values())
    assert kept == model.rank_allocator.budget
    for name, layer in model.adapted_layers:
        dead = ~torch.tensor(model.rank_pattern[name])
        assert torch.all(layer.lora_E[dead] == 0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_scores_mask_like_peft(bad):
    """Non-finite scores (no longer from non-finite gradients, whose steps are skipped, but e.g. from
    |p * g| overflowing): PEFT masks `score <= threshold`, so NaN ranks survive; flat == reference."""
    m1, m2, flat, ref = _twin_scorers()
    gen = torch.Generator().manual_seed(11)
    for step in range(2):
        _score_both(m1, m2, flat, ref, gen)
        if step == 1:
            for scorer in (flat, ref):  # layer_state() gives views of the EMAs: poison them in place
                state = scorer.layer_state()
                state[f"{flat.names[0]}.lora_A.ema_ipt"][1, 2] = bad
                state[f"{flat.names[2]}.lora_E.ema_unc"][0, 0] = bad
        flat.mask_to_budget(flat.init_bgt - 6)
        ref.mask_to_budget(ref.init_bgt - 6)
        for name, keep in flat.keep_by_layer().items():
            assert torch.equal(keep, ref.keep[name]), name
        assert int(flat.keep.sum()) == flat.init_bgt - 6  # the 6 lowest finite scores: no ties
    assert int(flat.nonfinite_steps) == int(ref.nonfinite_steps) == 0


# ---- non-finite gradients: the step is skipped on the device and counted ----------------------------
@pytest.mark.parametrize("backend", SCORER_BACKENDS)
@pytest.mark.parametrize("where", KINDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_nonfinite_step_is_as_if_it_never_happened(backend, where, value):
    model = scored_model(backend)
    gen = torch.Generator().manual_seed(1)
    run_scored_steps(model, range(7), gen)
    twin = copy.deepcopy(model)
    before = allocator_state(model)

    set_grads(model, poisoned(model, draw_grads(model, gen), where, value))
    model.update_and_allocate(7)  # not a mask step
    assert_same_state(allocator_state(model), before)
    assert int(model.rank_allocator.nonfinite_steps) == 1
    assert model.nonfinite_score_steps() == 1

    # Later steps (mask steps 9 and 12 among them) agree bit for bit with the twin that never saw step 7.
    for step in range(8, 14):
        grads = draw_grads(model, gen)
        budgets = []
        for m in (model, twin):
            set_grads(m, grads)
            budgets.append(m.update_and_allocate(step))
        assert budgets[0] == budgets[1]
        assert_same_state(allocator_state(model), allocator_state(twin))
    assert model.rank_allocator.masked
    assert int(twin.rank_allocator.nonfinite_steps) == 0


@pytest.mark.parametrize("backend", SCORER_BACKENDS)
def test_first_scoring_step_nonfinite_leaves_zero_emas(backend):
    """EMAs start at 0: a non-finite first step leaves them at 0 (they are allocated, not updated)."""
    model = scored_model(backend)
    gen = torch.Generator().manual_seed(4)
    set_grads(model, poisoned(model, draw_grads(model, gen), "lora_E", float("inf")))
    model.update_and_allocate(0)
    for key, ema in model.rank_allocator.scorer.layer_state().items():
        assert torch.all(ema == 0), key
    assert model.nonfinite_score_steps() == 1


def test_flat_and_reference_agree_with_nonfinite_steps():
    flat, ref = scored_model("torch"), scored_model("reference")
    gen = torch.Generator().manual_seed(5)
    for step in range(20):
        grads = draw_grads(flat, gen)
        if step % 4 == 1:
            grads = poisoned(flat, grads, KINDS[step % 3], float("nan"))
        for m in (flat, ref):
            set_grads(m, grads)
            m.update_and_allocate(step)
        assert_same_state(allocator_state(flat), allocator_state(ref))
    assert flat.nonfinite_score_steps() == ref.nonfinite_score_steps() == 5


def test_grads_finite_is_reusable_and_device_side():
    scorer = scored_model("torch").rank_allocator.scorer
    good = [torch.randn(3, 4), torch.randn(0, 5), torch.randn(7)]
    assert scorer._grads_finite(good).dtype == torch.bool
    assert scorer._grads_finite(good).shape == ()
    assert bool(scorer._grads_finite(good))
    for value in (float("inf"), float("-inf"), float("nan")):
        bad = [g.clone() for g in good]
        bad[2][3] = value
        assert not bool(scorer._grads_finite(bad))
    assert bool(scorer._grads_finite([torch.empty(0, 3)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("step", [7, 9], ids=["no-mask", "mask"])
def test_nonfinite_skip_has_no_host_sync_on_gpu(step):
    model = scored_model("torch").cuda()
    gen = torch.Generator().manual_seed(7)
    for s in range(step):
        set_grads(model, [g.cuda() for g in draw_grads(model, gen)])
        model.update_and_allocate(s)
    set_grads(model, [g.cuda() for g in poisoned(model, draw_grads(model, gen), "lora_A", float("nan"))])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.update_and_allocate(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model.nonfinite_score_steps() == 1


# ---- non-finite weights, and a mask step with no score update since the start --------------------------
def _any_scorer(backend: str):
    """``scored_model`` with the torch, reference or Triton (interpreter on the CPU) scorer."""
    if backend != "triton":
        return scored_model(backend)
    pytest.importorskip("adalora_fast.kernels.importance_ema")
    if "cpu" not in kernel_devices():
        pytest.skip("the Triton scorer runs on the CPU under TRITON_INTERPRET=1 only")
    from adalora_fast.allocator.triton_scorer import TritonScorer

    model = scored_model("torch")
    model.rank_allocator = RankAllocator(model.adapted_layers, model.adalora_config, backend="triton")
    assert type(model.rank_allocator.scorer) is TritonScorer
    return model


@pytest.mark.parametrize("backend", [*SCORER_BACKENDS, "triton"])
@pytest.mark.parametrize("where", KINDS)
def test_a_non_finite_weight_skips_the_step_as_a_non_finite_gradient_does(backend, where):
    model = _any_scorer(backend)
    gen = torch.Generator().manual_seed(1)
    run_scored_steps(model, range(3), gen)
    layer = model.adapted_layers[3][1]
    before = {k: v.clone() for k, v in model.rank_allocator.scorer.layer_state().items()}
    with torch.no_grad():
        getattr(layer, where).view(-1)[1] = float("nan")
    set_grads(model, draw_grads(model, gen))  # finite gradients
    model.update_and_allocate(3)
    after = model.rank_allocator.scorer.layer_state()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # EMAs bitwise unchanged, no NaN
    assert model.nonfinite_score_steps() == 1


@pytest.mark.parametrize("backend", [*SCORER_BACKENDS, "triton"])
def test_a_mask_step_without_any_score_update_masks_nothing(backend):
    """Every step before the first mask step skipped (GradScaler's warm-up): the EMAs are all zero, every
    score ties; PEFT's threshold would mask every rank. Nothing is masked instead, deterministically."""
    model = _any_scorer(backend)
    gen = torch.Generator().manual_seed(3)
    alloc = model.rank_allocator
    for step in range(alloc.config.total_step - alloc.config.tfinal):
        set_grads(model, poisoned(model, draw_grads(model, gen), "lora_A", float("inf")))
        budget = model.update_and_allocate(step)
        if alloc.masked:
            break
    assert alloc.masked and budget < alloc.init_bgt
    assert model.nonfinite_score_steps() == step + 1
    kept = sum(map(sum, model.rank_pattern.values()))
    assert kept == alloc.init_bgt >= budget
    assert all(bool(layer.lora_E.ne(0).all()) for _, layer in model.adapted_layers)
    # A budget of 0 still masks everything (target_r=0 asks for it).
    alloc.scorer.mask_to_budget(0)
    assert sum(map(sum, model.rank_pattern.values())) == 0
