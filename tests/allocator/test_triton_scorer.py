"""The Triton scorer (backend "triton") against the torch scorer: EMAs, masks, phases, launches, state."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, kernel_devices, tiny_llama

pytest.importorskip("adalora_fast.kernels.importance_ema")
from adalora_fast.kernels import importance_ema  # noqa: E402

from adalora_fast.allocator import FlatScorer  # noqa: E402
from adalora_fast.allocator.triton_scorer import TritonScorer  # noqa: E402
from adalora_fast.factors import FACTORS as KINDS

DEVICES = kernel_devices()


def _model(backend, device, num_layers=1, **cfg):
    cfg = {"init_r": 5, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 2, "total_step": 8, **cfg}
    base = tiny_llama(num_layers, hidden=32, intermediate=48, seed=0).to(device)
    m = af.get_adalora_model(base, af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend=backend, **cfg))
    with torch.no_grad():
        for _, layer in m.adapted_layers:
            layer.lora_E.normal_()
    return m


def _set_grads(models, gen, poison=None):
    for layers in zip(*(m.adapted_layers for m in models), strict=True):
        for kind in KINDS:
            g = torch.randn(getattr(layers[0][1], kind).shape, generator=gen)
            for _, layer in layers:
                getattr(layer, kind).grad = g.clone().to(layer.lora_A.device)
    if poison is not None:
        for m in models:
            m.adapted_layers[-1][1].lora_B.grad[0, 0] = poison


@pytest.mark.parametrize("device", DEVICES)
def test_scorer_is_the_triton_one(device):
    assert isinstance(_model("triton", device).rank_allocator.scorer, TritonScorer)
    assert type(_model("torch", device).rank_allocator.scorer) is FlatScorer


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_scorer_through_all_phases(device):
    fused, plain = _model("triton", device), _model("torch", device)
    gen = torch.Generator().manual_seed(0)
    for step in range(8):  # warm-up, budget phase (mask steps), final step, after final
        _set_grads([fused, plain], gen, poison=float("nan") if step == 3 else None)
        fused.update_and_allocate(step)
        plain.update_and_allocate(step)
        fs, ps = fused.rank_allocator.scorer.layer_state(), plain.rank_allocator.scorer.layer_state()
        assert fs.keys() == ps.keys()
        for k in fs:  # bitwise: same formulas, same roundings
            assert torch.equal(fs[k], ps[k]), (step, k)
        assert fused.rank_pattern == plain.rank_pattern, step
        for (_, a), (_, b) in zip(fused.adapted_layers, plain.adapted_layers, strict=True):
            assert torch.equal(a.lora_E, b.lora_E)
    assert int(fused.rank_allocator.nonfinite_steps) == int(plain.rank_allocator.nonfinite_steps) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_pointer_tables_rebuilt_only_when_pointers_change(device, monkeypatch):
    model = _model("triton", device)
    builds = []
    real = importance_ema.pointer_table
    monkeypatch.setattr(importance_ema, "pointer_table", lambda ts: builds.append(len(ts)) or real(ts))
    gen = torch.Generator().manual_seed(1)
    _set_grads([model], gen)
    model.update_and_allocate(0)
    assert len(builds) == 2  # parameters and gradients, once
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            for kind in KINDS:
                getattr(layer, kind).grad.normal_()  # same storage: no rebuild
    model.update_and_allocate(1)
    assert len(builds) == 2
    _set_grads([model], gen)  # new gradient tensors (as after zero_grad(set_to_none=True))
    model.update_and_allocate(2)
    assert len(builds) == 3


def _count_launches(monkeypatch) -> list[str]:
    launched: list[str] = []
    for name in ("_nonfinite_kernel", "_importance_ema_kernel", "_triplet_kernel"):
        kernel = getattr(importance_ema, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(importance_ema, name, Counting(kernel, name))
    return launched


@pytest.mark.parametrize("device", DEVICES)
def test_launches_and_aten_ops_do_not_grow_with_depth(device, monkeypatch):
    launched = _count_launches(monkeypatch)
    counts = {}
    for layers in (2, 16):
        model = _model("triton", device, num_layers=layers, total_step=40, tinit=0, tfinal=2)
        gen = torch.Generator().manual_seed(2)
        _set_grads([model], gen)
        model.update_and_allocate(0)  # the first call builds tables and buffers
        with torch.no_grad():
            for _, layer in model.adapted_layers:  # new values in the same storage: steady state
                for kind in KINDS:
                    getattr(layer, kind).grad.normal_()
        launched.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.update_and_allocate(2)  # a mask step
        ops = sorted(
            e.key for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in VIEW_OPS
        )
        counts[layers] = (list(launched), {k: ops.count(k) for k in set(ops)})
    assert counts[2][0] == counts[16][0] == ["_nonfinite_kernel", "_importance_ema_kernel", "_triplet_kernel"]
    assert counts[2][1] == counts[16][1]


VIEW_OPS = {"aten::view", "aten::reshape", "aten::as_strided", "aten::_reshape_alias", "aten::alias",
            "aten::detach", "aten::lift_fresh", "aten::t", "aten::transpose", "aten::select", "aten::slice",
            "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::empty", "aten::empty_strided",
            "aten::resolve_conj", "aten::resolve_neg"}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_resume_with_triton_scorer(device, tmp_path):
    gen = torch.Generator().manual_seed(3)
    model = _model("triton", device)
    for step in range(3):
        _set_grads([model], gen)
        model.update_and_allocate(step)
    model.save_pretrained(tmp_path)
    base = tiny_llama(1, hidden=32, intermediate=48, seed=0).to(device)
    resumed = af.AdaLoraModel.from_pretrained(base, tmp_path, is_trainable=True, backend="triton")
    a, b = model.rank_allocator.scorer.layer_state(), resumed.rank_allocator.scorer.layer_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)
    torch.testing.assert_close(
        resumed.rank_allocator.scorer.scores(), model.rank_allocator.scorer.scores(), rtol=0, atol=0
    )


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in DEVICES, reason="sync detection needs CUDA")
def test_no_host_sync_in_update_and_allocate_on_gpu():
    model = _model("triton", "cuda", total_step=12, tinit=0, tfinal=2)
    gen = torch.Generator().manual_seed(4)
    _set_grads([model], gen)
    model.update_and_allocate(0)  # tables built
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 12):  # budget phase, mask steps, final step, after final
            for _, layer in model.adapted_layers:
                for kind in KINDS:
                    getattr(layer, kind).grad.normal_()
            model.update_and_allocate(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
