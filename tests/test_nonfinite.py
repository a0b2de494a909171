"""Non-finite gradients (fp16 steps that GradScaler skips): the score update of such a step is skipped for
the whole model, on the device, and counted. Backends: the vectorised torch scorer and the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LLAMA_PROJ, batches, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adalora_fast as af
from adalora_fast.allocator import FlatScorer, RankAllocator, ReferenceScorer
from adalora_fast.checkpoint import NONFINITE_KEY, STATE_NAME

# Mask steps: step > tinit and step % deltaT == 0 -> 3, 6, 9, 12, ...; final step 35.
SCHEDULE = {"init_r": 5, "target_r": 2, "tinit": 2, "tfinal": 5, "deltaT": 3, "total_step": 40}
KINDS = ("lora_A", "lora_E", "lora_B")
BACKENDS = ["torch", "reference"]


def _model(backend, seed=0, **cfg):
    base = tiny_llama(2, seed=seed)
    config = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **{**SCHEDULE, **cfg})
    model = af.get_adalora_model(base, config)
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.normal_()
    if backend == "reference":
        model.rank_allocator = RankAllocator(model.adapted_layers, config, backend="reference")
    expected = ReferenceScorer if backend == "reference" else FlatScorer
    assert type(model.rank_allocator.scorer) is expected
    return model


def _grads(model, gen):
    """Fresh random gradients for every adapter parameter (a list, to give twins the same ones)."""
    out = []
    for _, layer in model.adapted_layers:
        for k in KINDS:
            out.append(torch.randn(getattr(layer, k).shape, generator=gen))
    return out


def _set_grads(model, grads):
    it = iter(grads)
    for _, layer in model.adapted_layers:
        for k in KINDS:
            getattr(layer, k).grad = next(it).clone()


def _poisoned(model, grads, where, value):
    """A copy of ``grads`` with one non-finite element in layer 3's ``where`` gradient."""
    grads = [g.clone() for g in grads]
    index = 3 * 3 + KINDS.index(where)
    grads[index].view(-1)[1] = value
    return grads


def _state(model):
    """Everything the allocator owns or writes: EMAs, keep masks, E values (cloned)."""
    alloc = model.rank_allocator
    out = {f"ema.{k}": v.clone() for k, v in alloc.scorer.layer_state().items()}
    out.update({f"keep.{k}": v.clone() for k, v in alloc.keep_mask().items()})
    for name, layer in model.adapted_layers:
        for k in KINDS:
            out[f"{name}.{k}"] = getattr(layer, k).detach().clone()
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        assert torch.isfinite(a[key].float()).all(), key


def _run(model, steps, gen_or_grads):
    for step in steps:
        grads = _grads(model, gen_or_grads)
        _set_grads(model, grads)
        model.update_and_allocate(step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", KINDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_nonfinite_step_is_as_if_it_never_happened(backend, where, value):
    model = _model(backend)
    gen = torch.Generator().manual_seed(1)
    _run(model, range(7), gen)
    twin = copy.deepcopy(model)
    before = _state(model)

    _set_grads(model, _poisoned(model, _grads(model, gen), where, value))
    model.update_and_allocate(7)  # not a mask step
    _assert_same(_state(model), before)
    assert int(model.rank_allocator.nonfinite_steps) == 1
    assert model.nonfinite_score_steps() == 1

    # Later steps (mask steps 9 and 12 among them) agree bit for bit with the twin that never saw step 7.
    for step in range(8, 14):
        grads = _grads(model, gen)
        budgets = []
        for m in (model, twin):
            _set_grads(m, grads)
            budgets.append(m.update_and_allocate(step))
        assert budgets[0] == budgets[1]
        _assert_same(_state(model), _state(twin))
    assert model.rank_allocator.masked
    assert int(twin.rank_allocator.nonfinite_steps) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_mask_step_masks_with_previous_scores(backend):
    model = _model(backend)
    gen = torch.Generator().manual_seed(2)
    _run(model, range(9), gen)
    twin = copy.deepcopy(model)

    _set_grads(model, _poisoned(model, _grads(model, gen), "lora_B", float("nan")))
    budget = model.update_and_allocate(9)  # a mask step
    assert budget < model.rank_allocator.init_bgt
    # The twin masks at the same budget from its (previous) scores, without any score update.
    twin.rank_allocator.scorer.mask_to_budget(budget)
    _assert_same(_state(model), _state(twin))
    assert sum(sum(p) for p in model.rank_pattern.values()) == budget
    assert model.nonfinite_score_steps() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_counts_scoring_steps_only(backend):
    model = _model(backend)
    gen = torch.Generator().manual_seed(3)
    bad = {4, 5, 11, 34, 35, 37}  # 35 is the final step, 37 after it: no scores are updated there
    for step in range(38):
        grads = _grads(model, gen)
        if step in bad:
            grads = _poisoned(model, grads, "lora_A", float("nan"))
        _set_grads(model, grads)
        model.update_and_allocate(step)
    assert model.nonfinite_score_steps() == 4
    counter = model.rank_allocator.nonfinite_steps
    assert counter.dtype == torch.int64 and counter.shape == ()
    assert sum(sum(p) for p in model.rank_pattern.values()) == 2 * len(model.adapted_names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_scoring_step_nonfinite_leaves_zero_emas(backend):
    """EMAs start at 0: a non-finite first step leaves them at 0 (they are allocated, not updated)."""
    model = _model(backend)
    gen = torch.Generator().manual_seed(4)
    _set_grads(model, _poisoned(model, _grads(model, gen), "lora_E", float("inf")))
    model.update_and_allocate(0)
    for key, ema in model.rank_allocator.scorer.layer_state().items():
        assert torch.all(ema == 0), key
    assert model.nonfinite_score_steps() == 1


def test_flat_and_reference_agree_with_nonfinite_steps():
    flat, ref = _model("torch"), _model("reference")
    gen = torch.Generator().manual_seed(5)
    for step in range(20):
        grads = _grads(flat, gen)
        if step % 4 == 1:
            grads = _poisoned(flat, grads, KINDS[step % 3], float("nan"))
        for m in (flat, ref):
            _set_grads(m, grads)
            m.update_and_allocate(step)
        _assert_same(_state(flat), _state(ref))
    assert flat.nonfinite_score_steps() == ref.nonfinite_score_steps() == 5


def test_grads_finite_is_reusable_and_device_side():
    scorer = _model("torch").rank_allocator.scorer
    good = [torch.randn(3, 4), torch.randn(0, 5), torch.randn(7)]
    assert scorer._grads_finite(good).dtype == torch.bool
    assert scorer._grads_finite(good).shape == ()
    assert bool(scorer._grads_finite(good))
    for value in (float("inf"), float("-inf"), float("nan")):
        bad = [g.clone() for g in good]
        bad[2][3] = value
        assert not bool(scorer._grads_finite(bad))
    assert bool(scorer._grads_finite([torch.empty(0, 3)]))


def test_counter_survives_save_and_load(tmp_path):
    model = _model("torch")
    gen = torch.Generator().manual_seed(6)
    for step in range(5):
        grads = _grads(model, gen)
        if step in (1, 3):
            grads = _poisoned(model, grads, "lora_B", float("inf"))
        _set_grads(model, grads)
        model.update_and_allocate(step)
    model.save_pretrained(tmp_path)
    base = tiny_llama(2, seed=0)
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert loaded.nonfinite_score_steps() == 2

    # A training-state file written before the counter existed still loads (counter 0).
    with safe_open(str(tmp_path / STATE_NAME), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(tmp_path / STATE_NAME))
    del state[NONFINITE_KEY]
    save_file(state, str(tmp_path / STATE_NAME), metadata=metadata)
    old = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert old.nonfinite_score_steps() == 0
    assert old.rank_allocator.last_step == 4


def test_grad_scaler_skipped_step_leaves_training_as_if_skipped():
    """A real loop with torch.amp.GradScaler: one step's gradients overflow, GradScaler skips
    optimizer.step(), update_and_allocate skips the scores; the run then equals (bit for bit) a run
    that never had that step."""
    data = batches(16)
    base = tiny_llama(2, seed=0)
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **{**SCHEDULE, "total_step": 16})
    runs = {}
    for skip_bad in (False, True):
        torch.manual_seed(3)
        model = af.get_adalora_model(copy.deepcopy(base), copy.deepcopy(cfg))
        with torch.no_grad():
            for _, layer in model.adapted_layers:
                layer.lora_E.normal_(std=0.1)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scaler = torch.amp.GradScaler("cpu")
        losses = {}
        for step in range(16):
            if step == 7 and skip_bad:
                continue  # the twin that never had the bad step
            x = data[step]
            hook = None
            if step == 7:  # overflow in one parameter's gradient
                layer = model.adapted_layers[5][1]
                hook = layer.lora_B.register_hook(lambda g: g * float("inf"))
            loss = model(input_ids=x, labels=x).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if hook is not None:
                hook.remove()
                assert not torch.isfinite(layer.lora_B.grad).all()
            model.update_and_allocate(step)
            opt.zero_grad()
            losses[step] = loss.detach()
        runs[skip_bad] = (model, losses)
    (bad_model, bad_losses), (twin, twin_losses) = runs[False], runs[True]
    assert bad_model.nonfinite_score_steps() == 1 and twin.nonfinite_score_steps() == 0
    for step, loss in twin_losses.items():
        assert torch.equal(bad_losses[step], loss), step
    _assert_same(_state(bad_model), _state(twin))
    assert bad_model.rank_pattern == twin.rank_pattern


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("step", [7, 9], ids=["no-mask", "mask"])
def test_nonfinite_skip_has_no_host_sync_on_gpu(step):
    model = _model("torch").cuda()
    gen = torch.Generator().manual_seed(7)
    for s in range(step):
        _set_grads(model, [g.cuda() for g in _grads(model, gen)])
        model.update_and_allocate(s)
    _set_grads(model, [g.cuda() for g in _poisoned(model, _grads(model, gen), "lora_A", float("nan"))])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.update_and_allocate(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model.nonfinite_score_steps() == 1
