"""Training-loop variants give the plain loop's result: gradient checkpointing with gradient
accumulation, torch.compile of the adapted model; bf16 autocast trains through the whole schedule; a
step that torch.amp.GradScaler skips leaves training as if it never happened. (Non-finite gradients in
the scorers: tests/allocator/test_scorers.py; DDP: tests/integration/test_ddp.py; Trainer:
tests/integration/test_trainer.py.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import adalora_fast as af
from tests.helpers import (
    LLAMA_PROJ,
    NONFINITE_SCHEDULE,
    allocator_state,
    assert_same_state,
    batches,
    tiny_llama,
)

CONFIG = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, target_modules=LLAMA_PROJ)


def _model(seed: int = 0) -> af.AdaLoraModel:
    torch.manual_seed(seed)
    return af.get_adalora_model(tiny_llama(2), af.AdaLoraConfig(**CONFIG)).train()


def _train(model, data, accumulation: int = 1, autocast: torch.dtype | None = None, wrapper=None) -> list:
    """The documented loop; returns the rank pattern after every step. ``wrapper`` is what is called
    (e.g. a compiled model); the allocator is reached through it with af.update_and_allocate."""
    run = wrapper if wrapper is not None else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    patterns = []
    for step, x in enumerate(data):
        for part in x.chunk(accumulation):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = run(input_ids=part, labels=part).loss
            (loss / accumulation).backward()
        opt.step()
        af.update_and_allocate(run, step)
        opt.zero_grad()
        patterns.append(model.rank_pattern)
    return patterns


def _assert_same_adapters(a: af.AdaLoraModel, b: af.AdaLoraModel, rtol: float, atol: float) -> None:
    for (name, x), (_, y) in zip(a.adapted_layers, b.adapted_layers, strict=True):
        for k in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(y, k), getattr(x, k), rtol=rtol, atol=atol, msg=f"{name}.{k}")


def test_gradient_checkpointing_with_accumulation_matches_the_plain_loop():
    data = batches(CONFIG["total_step"], batch=8)
    plain = _model()
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames it in v6
        checkpointed.model.gradient_checkpointing_enable()
    ref = _train(plain, data)
    got = _train(checkpointed, data, accumulation=2)
    assert got == ref
    assert sum(map(sum, got[-1].values())) == CONFIG["target_r"] * len(plain.adapted_names)
    _assert_same_adapters(plain, checkpointed, rtol=1e-5, atol=1e-6)


def test_torch_compile_of_the_adapted_model_matches_eager():
    data = batches(CONFIG["total_step"], batch=4)
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    # aot_eager: Dynamo and AOTAutograd trace the adapted model as inductor would receive it, without
    # inductor's C++ code generation (minutes on a 2-core CI machine).
    compiled = torch.compile(compiled_model, backend="aot_eager")
    ref = _train(eager, data)
    got = _train(compiled_model, data, wrapper=compiled)
    assert got == ref
    _assert_same_adapters(eager, compiled_model, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_through_the_schedule():
    data = batches(CONFIG["total_step"], batch=4)
    bf16 = _model()
    patterns = _train(bf16, data, autocast=torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in bf16.named_parameters() if "lora_" in n)
    assert bf16.rank_allocator.finalized
    assert sum(map(sum, patterns[-1].values())) == CONFIG["target_r"] * len(bf16.adapted_names)
    x = data[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = bf16(input_ids=x, labels=x).loss
    assert torch.isfinite(loss_bf16)


@pytest.mark.parametrize("wrap", ["compile", "dataparallel"])
def test_update_and_allocate_reaches_through_wrappers(wrap):
    model = _model()
    wrapped = torch.compile(model) if wrap == "compile" else torch.nn.DataParallel(model)
    assert af.unwrap_model(wrapped) is model
    with pytest.raises(TypeError, match="no adalora_fast.AdaLoraModel in Linear"):
        af.unwrap_model(torch.nn.Linear(2, 2))


def test_torch_export_of_the_adapted_model_matches_eager():
    model = _model().eval()
    x = batches(1)[0]
    exported = torch.export.export(model, (), {"input_ids": x, "use_cache": False})
    with torch.no_grad():
        expected = model(input_ids=x, use_cache=False).logits
        got = exported.module()(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skipped_step_leaves_training_as_if_skipped():
    """A real loop with torch.amp.GradScaler: one step's gradients overflow, GradScaler skips
    optimizer.step(), update_and_allocate skips the scores; the run then equals (bit for bit) a run
    that never had that step."""
    data = batches(16)
    base = tiny_llama(2, seed=0)
    cfg = af.AdaLoraConfig(
        target_modules=LLAMA_PROJ, backend="torch", **{**NONFINITE_SCHEDULE, "total_step": 16}
    )
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
    assert_same_state(allocator_state(bad_model), allocator_state(twin))
    assert bad_model.rank_pattern == twin.rank_pattern
