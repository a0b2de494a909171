"""The vectorised allocator (backend "torch") against the per-layer reference, phases and op counts."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import LLAMA_PROJ, tiny_llama
from torch.profiler import ProfilerActivity, profile

import adalora_fast as af
from adalora_fast.allocator import FlatScorer, RankAllocator, ReferenceScorer


def _model(num_layers=2, seed=0, hidden=32, intermediate=48, **cfg):
    cfg = {"init_r": 5, "target_r": 2, "total_step": 50, "target_modules": LLAMA_PROJ, **cfg}
    base = tiny_llama(num_layers, hidden=hidden, intermediate=intermediate, seed=seed)
    m = af.get_adalora_model(base, af.AdaLoraConfig(**cfg))
    with torch.no_grad():
        for _, layer in m.adapted_layers:
            layer.lora_E.normal_()
    return m


def _random_grads(model, gen):
    for _, layer in model.adapted_layers:
        for k in ("lora_A", "lora_E", "lora_B"):
            p = getattr(layer, k)
            p.grad = torch.randn(p.shape, generator=gen)


def _copy_grads(src, dst):
    for (_, a), (_, b) in zip(src.adapted_layers, dst.adapted_layers, strict=True):
        for k in ("lora_A", "lora_E", "lora_B"):
            getattr(b, k).grad = getattr(a, k).grad.clone()


def _twin_scorers():
    """Two identical models, one scored by the flat scorer, the other by the reference."""
    m1 = _model()
    m2 = copy.deepcopy(m1)
    cfg = m1.adalora_config
    flat = FlatScorer(m1.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    ref = ReferenceScorer(m2.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    return m1, m2, flat, ref


def test_flat_scorer_matches_reference_exactly():
    m1, m2, flat, ref = _twin_scorers()
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        _random_grads(m1, gen)
        _copy_grads(m1, m2)
        flat.update_scores()
        ref.update_scores()
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
    m1 = _model()
    m2 = copy.deepcopy(m1)
    cfg = m1.adalora_config
    ref = ReferenceScorer(m1.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    gen = torch.Generator().manual_seed(3)
    _random_grads(m1, gen)
    ref.update_scores()
    flat = FlatScorer(m2.adapted_layers, cfg.beta1, cfg.beta2, cfg.target_r)
    flat.load_layer_state(ref.layer_state())
    for i, name in enumerate(flat.names):
        torch.testing.assert_close(flat.scores()[i], ref.scores()[name], rtol=1e-6, atol=0)


def _train_steps(model, steps, gen):
    for step in steps:
        _random_grads(model, gen)
        yield step, model.update_and_allocate(step)


def test_phases_and_budgets():
    cfg = {"init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 4, "deltaT": 2, "total_step": 20}
    model = _model(**cfg)
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
    model = _model(total_step=None)
    with pytest.raises(ValueError, match="total_step"):
        model.update_and_allocate(0)
    model.set_total_step(10)
    _random_grads(model, torch.Generator().manual_seed(0))
    model.update_and_allocate(0)


def test_missing_gradient_names_module():
    model = _model()
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A has no gradient"):
        model.update_and_allocate(0)


def test_rebinds_after_dtype_change():
    model = _model()
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


# ---- op counts ------------------------------------------------------------------------------------
HOST_SYNC_OPS = {"aten::item", "aten::_local_scalar_dense"}
# Zero-copy view ops: they launch no kernel. The CPU implementation of a large torch.cat makes one
# internal view per input (on CUDA it is one kernel), and the regulariser's backward must hand each
# parameter its own gradient tensor, which costs one view per parameter (autograd then accumulates
# each .grad itself). Everything else -- every op that computes or copies -- must not grow with depth.
VIEW_OPS = {
    "aten::as_strided", "aten::narrow", "aten::slice", "aten::view", "aten::transpose", "aten::unsqueeze",
    "aten::t", "aten::alias", "aten::expand", "aten::select", "aten::reshape", "aten::_reshape_alias",
    "aten::squeeze", "aten::permute", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::detach", "aten::resolve_conj", "aten::resolve_neg",
}  # fmt: skip


def _under_accumulate_grad(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if "AccumulateGrad" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def _aten_ops(fn) -> Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(
        e.name for e in prof.events() if e.name.startswith("aten::") and not _under_accumulate_grad(e)
    )


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
            model = _model(layers, hidden=128, intermediate=256, init_r=12, target_r=4, **cfg)
            gen = torch.Generator().manual_seed(0)
            # Earlier steps: scores exist (their one-time allocation is not part of a steady-state step).
            for s in sorted(x for x in {0, 6, step - 1} if x < step):
                _random_grads(model, gen)
                model.update_and_allocate(s)
            _random_grads(model, gen)
            if nonfinite:
                _poison_grads(model)
            ops = _aten_ops(lambda m=model: m.update_and_allocate(step))
            assert not HOST_SYNC_OPS & set(ops), ops
            counts[layers, nonfinite] = sum(v for k, v in ops.items() if k not in VIEW_OPS)
            if nonfinite and step < 40:
                assert int(model.rank_allocator.nonfinite_steps) == 1
    assert len(set(counts.values())) == 1, counts


def test_regulariser_compute_op_count_independent_of_depth():
    counts = []
    for layers in (2, 8):
        model = _model(layers)

        def fwd_bwd(m=model):
            m.orth_regularization().backward()

        fwd_bwd()  # grads exist: the profiled backward accumulates, as in training
        ops = _aten_ops(fwd_bwd)
        counts.append(sum(v for k, v in ops.items() if k not in VIEW_OPS))
    assert counts[0] == counts[1], counts


def test_reference_backend_can_be_forced():
    model = _model()
    alloc = RankAllocator(model.adapted_layers, model.adalora_config, backend="reference")
    assert isinstance(alloc.scorer, ReferenceScorer)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_scores_mask_like_peft(bad):
    """Non-finite scores (no longer from non-finite gradients, whose steps are skipped, but e.g. from
    |p * g| overflowing): PEFT masks `score <= threshold`, so NaN ranks survive; flat == reference."""
    m1, m2, flat, ref = _twin_scorers()
    gen = torch.Generator().manual_seed(11)
    for step in range(2):
        _random_grads(m1, gen)
        _copy_grads(m1, m2)
        flat.update_scores()
        ref.update_scores()
        if step == 1:
            for scorer in (flat, ref):  # layer_state() gives views of the EMAs: poison them in place
                state = scorer.layer_state()
                state[f"{flat.names[0]}.lora_A.ema_ipt"][1, 2] = bad
                state[f"{flat.names[2]}.lora_E.ema_unc"][0, 0] = bad
        flat.mask_to_budget(flat.init_bgt - 6)
        ref.mask_to_budget(ref.init_bgt - 6)
        for name, keep in flat.keep_by_layer().items():
            assert torch.equal(keep, ref.keep[name]), name
    assert flat.keep.sum() > 0
    assert int(flat.nonfinite_steps) == int(ref.nonfinite_steps) == 0
