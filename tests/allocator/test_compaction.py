"""Compaction: masked ranks dropped physically (model.compact(), compact_after_final=True), in place, with
the optimizer state sliced; results equal soft masking; checkpoints identical; resume; errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import adalora_fast as af
from adalora_fast.allocator import FlatScorer, ReferenceScorer
from adalora_fast.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME
from adalora_fast.factors import FACTORS as KINDS
from adalora_fast.reference import orth_regularization as reference_orth_reg
from tests.helpers import (
    HOST_SYNC_OPS,
    LLAMA_PROJ,
    VIEW_OPS,
    aten_ops,
    batches,
    logits,
    tiny_gpt2,
    tiny_llama,
    trainable_params,
)

# Mask steps 4, 6, ..., final pattern at step 22 (= total_step - tfinal), then 7 more steps.
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 8, "deltaT": 2, "total_step": 30}
FINAL = SCHEDULE["total_step"] - SCHEDULE["tfinal"]


def _config(**cfg):
    return af.AdaLoraConfig(
        target_modules=LLAMA_PROJ, backend="torch", lora_dropout=0.0, **{**SCHEDULE, **cfg}
    )


def _new(base, seed=5, **cfg):
    torch.manual_seed(seed)
    config = _config(**cfg) if "target_modules" not in cfg else af.AdaLoraConfig(**{**SCHEDULE, **cfg})
    return af.get_adalora_model(copy.deepcopy(base), config)


def _adapter_params(model):
    return [getattr(layer, k) for _, layer in model.adapted_layers for k in KINDS]


def _train(model, opt, steps, data, pass_optimizer=True):
    losses = {}
    for step in steps:
        x = data[step]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step, optimizer=opt if pass_optimizer else None)
        opt.zero_grad()
        losses[step] = loss.detach()
    return losses


def _eval_loss(model, x):
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss


def _kept_budget_params(model):
    """Adapter parameters a model holding exactly its kept ranks has."""
    return sum(
        sum(model.rank_pattern[n]) * (m.in_features + m.out_features + 1) for n, m in model.adapted_layers
    )


def _assert_rel_close(a, b, rtol=1e-5):
    assert torch.allclose(a, b, rtol=rtol, atol=0), (a, b)


@pytest.mark.parametrize("builder", ["llama", "gpt2"])
def test_compact_after_final_equals_soft_masking(builder):
    """Same seed, data, AdamW, lora_dropout 0, backend torch, orth_reg_weight 0: every step's loss, the
    loss after the last step, outputs and the pattern equal the soft-masked run; the compacted model
    holds exactly the kept budget."""
    steps = SCHEDULE["total_step"]
    if builder == "llama":
        base, extra = tiny_llama(seed=0), {}
    else:  # GPT-2 Conv1D layers (fan_in_fan_out), default targets
        base, extra = tiny_gpt2(seed=0), {"target_modules": None, "backend": "torch"}
    data = batches(steps + 1)
    runs = {}
    for compact in (False, True):
        model = _new(base, orth_reg_weight=0.0, compact_after_final=compact, **extra)
        opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
        params_before = [id(p) for p in _adapter_params(model)]
        losses = _train(model, opt, range(steps), data)
        losses["eval"] = _eval_loss(model, data[steps])
        assert [id(p) for p in _adapter_params(model)] == params_before  # same Parameter objects
        runs[compact] = (model, losses)
    (soft, soft_losses), (compacted, comp_losses) = runs[False], runs[True]
    assert compacted.compacted and not soft.compacted
    for step, loss in soft_losses.items():
        _assert_rel_close(comp_losses[step], loss)
    x = data[0]
    soft.eval(), compacted.eval()
    torch.testing.assert_close(logits(compacted, x), logits(soft, x), rtol=1e-5, atol=1e-6)
    assert compacted.rank_pattern == soft.rank_pattern
    assert all(len(p) == SCHEDULE["init_r"] for p in compacted.rank_pattern.values())
    n_params = sum(p.numel() for p in _adapter_params(compacted))
    assert n_params == _kept_budget_params(soft) < sum(p.numel() for p in _adapter_params(soft))
    assert sum(compacted.kept_ranks().values()) == sum(layer.r for _, layer in compacted.adapted_layers)
    for _, layer in compacted.adapted_layers:
        assert layer.ranknum.item() == SCHEDULE["init_r"]
        assert layer.lora_A.shape == (layer.r, layer.in_features)
        assert layer.lora_B.shape == (layer.out_features, layer.r)
    if builder == "gpt2":
        assert all(layer.fan_in_fan_out for _, layer in compacted.adapted_layers)
        merged_soft = copy.deepcopy(soft).merge_and_unload()
        merged_comp = copy.deepcopy(compacted).merge_and_unload()
        for (name, a), (_, b) in zip(
            merged_soft.named_parameters(), merged_comp.named_parameters(), strict=True
        ):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_compaction_happens_at_the_final_step_and_later_steps_are_free():
    data = batches(SCHEDULE["total_step"])
    model = _new(tiny_llama(seed=0), compact_after_final=True)
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    _train(model, opt, range(FINAL), data)
    assert not model.compacted and all(layer.r == 4 for _, layer in model.adapted_layers)
    _train(model, opt, [FINAL], data)
    assert model.compacted
    assert sum(layer.r for _, layer in model.adapted_layers) == sum(model.kept_ranks().values())
    # Later steps: nothing to re-mask (the pattern holds by construction), no compute op, no sync.
    x = data[FINAL + 1]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    ops = aten_ops(lambda: model.update_and_allocate(FINAL + 1, optimizer=opt))
    assert not HOST_SYNC_OPS & set(ops)
    assert sum(v for k, v in ops.items() if k not in VIEW_OPS) == 0, ops
    assert (
        model.update_and_allocate(FINAL + 2) == model.rank_allocator.target_bgt
    )  # optimizer no longer needed
    with pytest.raises(ValueError, match=f"the last call scored step {FINAL + 2}"):
        model.update_and_allocate(FINAL - 1, optimizer=opt)
    model.rank_allocator.reset_step()  # going back on purpose: compacted layers still refuse it
    with pytest.raises(RuntimeError, match="compacted"):
        model.update_and_allocate(FINAL - 1, optimizer=opt)


def test_missing_optimizer_is_a_clear_error_and_changes_nothing():
    data = batches(SCHEDULE["total_step"])
    model = _new(tiny_llama(seed=0), compact_after_final=True)
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    _train(model, opt, range(FINAL), data)  # the optimizer is not needed before the final step
    x = data[FINAL]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    before = {n: t.clone() for n, t in model.rank_allocator.scorer.layer_state().items()}
    with pytest.raises(ValueError, match=r"compact_after_final=True.*optimizer=opt"):
        model.update_and_allocate(FINAL)
    alloc = model.rank_allocator
    assert not alloc.finalized and not model.compacted
    assert all(torch.equal(t, before[n]) for n, t in alloc.scorer.layer_state().items())
    model.update_and_allocate(FINAL, optimizer=opt)
    assert model.compacted


def test_optimizer_state_is_sliced_and_training_continues():
    data = batches(SCHEDULE["total_step"])
    model = _new(tiny_llama(seed=0))
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    _train(model, opt, range(FINAL + 1), data)
    soft_model, soft_opt = copy.deepcopy((model, opt))  # one deepcopy keeps the param -> state mapping
    pattern = model.rank_pattern
    assert model.compact(optimizer=opt)
    for (name, layer), (_, soft_layer) in zip(model.adapted_layers, soft_model.adapted_layers, strict=True):
        keep = torch.tensor(pattern[name])
        for kind, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            p, q = getattr(layer, kind), getattr(soft_layer, kind)
            assert torch.equal(p.detach(), q.detach().index_select(dim, keep.nonzero().flatten()))
            state, soft_state = opt.state[p], soft_opt.state[q]
            assert state.keys() == soft_state.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert torch.equal(state["step"], soft_state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].shape == p.shape
                assert torch.equal(state[key], soft_state[key].index_select(dim, keep.nonzero().flatten()))
    _train(model, opt, range(FINAL + 1, SCHEDULE["total_step"]), data)
    assert all(torch.isfinite(p).all() for p in _adapter_params(model))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
        lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    ],
    ids=["sgd-momentum", "adam-amsgrad", "adagrad", "rmsprop-centered", "adamw-for-loop", "adamax"],
)
def test_any_optimizer_with_param_shaped_state(make_opt):
    data = batches(SCHEDULE["total_step"])
    model = _new(tiny_llama(seed=0), compact_after_final=True)
    opt = make_opt(trainable_params(model))
    _train(model, opt, range(FINAL + 3), data)
    assert model.compacted
    for p in _adapter_params(model):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                assert value.shape == p.shape, key


def test_unsliceable_optimizer_state_is_refused_before_anything_changes():
    class Factored(torch.optim.SGD):
        """Keeps a per-row statistic (shape (rows,)), like factored second-moment optimizers."""

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.dim() == 2 and p.shape[1] > 1:
                        self.state[p]["row_sq"] = p.grad.square().mean(dim=1)
            return super().step(closure)

    data = batches(SCHEDULE["total_step"])
    model = _new(tiny_llama(seed=0))
    opt = Factored(trainable_params(model), lr=1e-2)
    _train(model, opt, range(FINAL + 1), data)
    shapes = [p.shape for p in _adapter_params(model)]
    with pytest.raises(ValueError, match=r"cannot compact model\.layers\.0\..*'row_sq'"):
        model.compact(optimizer=opt)
    assert [p.shape for p in _adapter_params(model)] == shapes and not model.compacted


def test_compact_before_any_mask_is_a_no_op_and_mid_budget_is_an_error():
    data = batches(SCHEDULE["total_step"])
    model = _new(tiny_llama(seed=0))
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    shapes = [p.shape for p in _adapter_params(model)]
    assert model.compact(optimizer=opt) is False  # nothing is masked yet
    _train(model, opt, range(3), data)  # warm-up: still no mask
    assert model.compact(optimizer=opt) is False
    assert [p.shape for p in _adapter_params(model)] == shapes and not model.compacted
    _train(model, opt, range(3, 8), data)  # budget phase, masks applied
    with pytest.raises(RuntimeError, match=r"before the final rank pattern.*total_step - tfinal = 22"):
        model.compact(optimizer=opt)
    assert [p.shape for p in _adapter_params(model)] == shapes
    _train(model, opt, range(8, FINAL + 1), data)
    assert model.compact(optimizer=opt) is True
    assert model.compact(optimizer=opt) is False  # already compacted
    # A model loaded for inference already holds only its kept ranks.
    assert af.AdaLoraModel(tiny_llama(seed=0), _config(), is_trainable=False).compact() is False


def _finalized_with_rank0_layer(base):
    """Trained to the final step; then layer 1 keeps nothing and layer 2 keeps everything."""
    data = batches(SCHEDULE["total_step"])
    model = _new(base)
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    _train(model, opt, range(FINAL + 1), data)
    scorer = model.rank_allocator.scorer
    keep = {n: k.clone() for n, k in scorer.keep_by_layer().items()}
    keep[model.adapted_names[1]][:] = False
    keep[model.adapted_names[2]][:] = True
    scorer.set_keep(keep)
    scorer.apply_keep()
    return model, opt, data


def test_rank0_layers_compact_train_and_save(tmp_path):
    base = tiny_llama(seed=0)
    soft, soft_opt, data = _finalized_with_rank0_layer(base)
    comp, comp_opt = copy.deepcopy((soft, soft_opt))
    assert comp.compact(optimizer=comp_opt)
    rank0 = comp.model.get_submodule(comp.adapted_names[1])
    assert rank0.r == 0 and rank0.lora_A.shape == (0, rank0.in_features) and rank0.lora_B.shape[1] == 0
    assert comp.model.get_submodule(comp.adapted_names[2]).r == SCHEDULE["init_r"]
    assert comp.rank_pattern == soft.rank_pattern
    assert sum(comp.rank_pattern[comp.adapted_names[1]]) == 0
    x = data[0]
    soft.eval(), comp.eval()
    torch.testing.assert_close(logits(comp, x), logits(soft, x), rtol=1e-5, atol=1e-6)
    # Training goes on (rank-0 parameters are empty; AdamW steps them) with the same outputs as soft masking.
    soft.train(), comp.train()
    for m, o in ((soft, soft_opt), (comp, comp_opt)):
        m.adalora_config.orth_reg_weight = 0.0
        _train(m, o, range(FINAL + 1, FINAL + 4), data)
    soft.eval(), comp.eval()
    torch.testing.assert_close(logits(comp, x), logits(soft, x), rtol=1e-5, atol=1e-6)
    comp.save_pretrained(tmp_path)
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.model.get_submodule(comp.adapted_names[1]).r == 0
    torch.testing.assert_close(logits(loaded, x), logits(comp, x), rtol=1e-6, atol=1e-7)


def test_saving_a_compacted_model_gives_the_soft_masked_checkpoint(tmp_path):
    base = tiny_llama(seed=0)
    soft, soft_opt, data = _finalized_with_rank0_layer(base)
    comp, comp_opt = copy.deepcopy((soft, soft_opt))
    comp.compact(optimizer=comp_opt)
    soft.save_pretrained(tmp_path / "soft")
    comp.save_pretrained(tmp_path / "comp")
    a, b = load_file(str(tmp_path / "soft" / WEIGHTS_NAME)), load_file(str(tmp_path / "comp" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "soft" / WEIGHTS_NAME).read_bytes() == (tmp_path / "comp" / WEIGHTS_NAME).read_bytes()
    cfg_soft = json.loads((tmp_path / "soft" / CONFIG_NAME).read_text())
    cfg_comp = json.loads((tmp_path / "comp" / CONFIG_NAME).read_text())
    assert cfg_comp == cfg_soft
    assert "compact_after_final" not in cfg_comp
    x = data[1]
    comp.eval()

    def base_copy():
        return copy.deepcopy(base)

    for trainable in (False, True):
        loaded = af.AdaLoraModel.from_pretrained(
            copy.deepcopy(base), tmp_path / "comp", is_trainable=trainable
        )
        loaded.eval()
        torch.testing.assert_close(logits(loaded, x), logits(comp, x), rtol=1e-6, atol=1e-7)
        assert loaded.rank_pattern == soft.rank_pattern
    # The PEFT-format files alone (no training state) load as well, also for training.
    (tmp_path / "comp" / STATE_NAME).unlink()
    for trainable in (False, True):
        loaded = af.AdaLoraModel.from_pretrained(
            copy.deepcopy(base), tmp_path / "comp", is_trainable=trainable
        )
        loaded.eval()
        torch.testing.assert_close(logits(loaded, x), logits(comp, x), rtol=1e-6, atol=1e-7)


def test_compacted_checkpoint_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=0)
    model, opt, data = _finalized_with_rank0_layer(base)
    model.compact(optimizer=opt)
    model.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    model.eval()
    torch.testing.assert_close(logits(pm, data[2]), logits(model, data[2]), rtol=1e-5, atol=1e-6)


def test_resume_of_a_compacted_model_is_bit_identical(tmp_path):
    steps = SCHEDULE["total_step"]
    data = batches(steps)
    base = tiny_llama(seed=0)
    ref = _new(base, compact_after_final=True)
    first = copy.deepcopy(ref)
    opt = torch.optim.AdamW(trainable_params(ref), lr=1e-2)
    _train(ref, opt, range(steps), data)

    opt1 = torch.optim.AdamW(trainable_params(first), lr=1e-2)
    _train(first, opt1, range(FINAL + 3), data)
    assert first.compacted
    first.save_pretrained(tmp_path)
    torch.save(opt1.state_dict(), tmp_path / "opt.pt")

    second = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert second.compacted and second.adalora_config.compact_after_final
    assert second.rank_pattern == first.rank_pattern
    opt2 = torch.optim.AdamW(trainable_params(second), lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    _train(second, opt2, range(FINAL + 3, steps), data)
    assert second.rank_pattern == ref.rank_pattern
    for (name, a), (_, b) in zip(ref.adapted_layers, second.adapted_layers, strict=True):
        for k in KINDS:
            assert torch.equal(getattr(a, k), getattr(b, k)), f"{name}.{k}"


def test_compact_after_final_survives_save_before_the_final_step(tmp_path):
    """Saved mid-training (not compacted yet): the resumed run still compacts at the final step."""
    data = batches(SCHEDULE["total_step"])
    base = tiny_llama(seed=0)
    model = _new(base, compact_after_final=True)
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    _train(model, opt, range(10), data)
    model.save_pretrained(tmp_path)
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert loaded.adalora_config.compact_after_final and not loaded.compacted
    opt2 = torch.optim.AdamW(trainable_params(loaded), lr=1e-2)
    _train(loaded, opt2, range(10, FINAL + 1), data)
    assert loaded.compacted


def test_scorer_after_compaction_and_stale_flat_binding():
    data = batches(SCHEDULE["total_step"])
    model = _new(tiny_llama(seed=0))
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    _train(model, opt, range(FINAL + 1), data)
    flat = model.rank_allocator.scorer
    assert isinstance(flat, FlatScorer)
    counter = model.rank_allocator.nonfinite_steps
    model.compact(optimizer=opt)
    assert isinstance(model.rank_allocator.scorer, ReferenceScorer)
    assert model.rank_allocator.nonfinite_steps is counter
    assert len({layer.r for _, layer in model.adapted_layers}) > 1  # the layers now differ in rank
    with pytest.raises(RuntimeError, match=r"resized \(compact\(\)\?\)"):
        flat.bind()  # a FlatScorer kept from before refuses clearly instead of mis-binding
    model.build_allocator()  # a fresh allocator over the compacted layers works (per-layer scorer)
    assert isinstance(model.rank_allocator.scorer, ReferenceScorer)


def test_regulariser_after_compaction_sees_only_kept_ranks():
    """With orth_reg_weight > 0 compaction differs from soft masking by design: the regulariser sums
    over the kept rows of A / columns of B only. The model outputs stay equal."""
    base = tiny_llama(seed=0)
    soft, soft_opt, data = _finalized_with_rank0_layer(base)
    comp = copy.deepcopy(soft)
    comp.compact()
    As, Bs = [], []
    for name, layer in soft.adapted_layers:
        keep = torch.tensor(soft.rank_pattern[name]).nonzero().flatten()
        As.append(layer.lora_A.detach()[keep])
        Bs.append(layer.lora_B.detach()[:, keep])
    torch.testing.assert_close(comp.orth_regularization(), reference_orth_reg(As, Bs), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(comp.orth_regularization(), soft.orth_regularization())
    soft.eval(), comp.eval()
    torch.testing.assert_close(logits(comp, data[0]), logits(soft, data[0]), rtol=1e-5, atol=1e-6)


def test_fused_layer_runs_compacted_ranks():
    """The Triton layer kernels (interpreter on the CPU) take the compacted, per-layer ranks (0 included)."""
    base = tiny_llama(seed=0)
    soft, soft_opt, data = _finalized_with_rank0_layer(base)
    comp = copy.deepcopy(soft)
    comp.compact()
    expected = logits(soft.eval(), data[0])
    for _, layer in comp.adapted_layers:
        layer.backend = "triton"
    comp.eval()
    torch.testing.assert_close(logits(comp, data[0]), expected, rtol=1e-5, atol=1e-5)
