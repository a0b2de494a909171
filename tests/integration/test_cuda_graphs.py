"""CUDA graphs for static-shape training (issue 18 item 4): the fused layer captured with
``torch.cuda.make_graphed_callables`` equals the eager layer, dropout draws fresh masks at every
replay, and ``torch.compile(mode="reduce-overhead")`` of an adapted model trains as eager does with
the allocator between steps. GPU only (CUDA graphs); on the CPU every test here is skipped."""

from __future__ import annotations

import pytest
import torch

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, kernel_devices, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in kernel_devices(), reason="CUDA graphs need compiled kernels on CUDA"),
]


def _layer(p: float) -> af.SVDLinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 192).cuda().requires_grad_(False)
    layer = af.SVDLinear(base, r=12, lora_alpha=12.0, lora_dropout=p, backend="triton").train()
    with torch.no_grad():
        for t in (layer.lora_A, layer.lora_E, layer.lora_B):
            t.normal_()
    return layer


def _run(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    for t in (x, *layer.parameters()):
        t.grad = None
    y = layer(x)
    y.backward(dy)
    trained = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    return [y.detach().clone(), x.grad.clone(), *trained]


def test_graphed_layer_equals_the_eager_layer():
    eager = _layer(0.0)
    graphed = torch.cuda.make_graphed_callables(
        _layer(0.0), (torch.randn(64, 256, device="cuda", requires_grad=True),)
    )
    for seed in range(3):  # fresh inputs copied into the captured buffers at each replay
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(64, 256, device="cuda", generator=g, requires_grad=True)
        dy = torch.randn(64, 192, device="cuda", generator=g)
        for a, b in zip(_run(graphed, x, dy), _run(eager, x, dy), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dropout_draws_a_new_mask_at_every_replay():
    layer = _layer(0.3)
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    y1, y2 = graphed(x).detach().clone(), graphed(x).detach().clone()
    assert not torch.equal(y1, y2)  # the captured seed draw advances the CUDA generator per replay
    with torch.no_grad():
        base = layer.base_layer(x)
    assert (y1 - base).abs().max() > 0 and (y2 - base).abs().max() > 0


def _train(model: torch.nn.Module, adapted: af.AdaLoraModel, steps: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step, ids in enumerate(batches(steps, batch=4, seq=16)):
        ids = ids.cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        adapted.update_and_allocate(step)  # masks lora_E in place: the captured addresses stay valid
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_reduce_overhead_compile_trains_like_eager():
    from torch._dynamo.utils import counters

    cfg = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, target_modules=LLAMA_PROJ)
    eager = af.get_adalora_model(tiny_llama(2).cuda(), af.AdaLoraConfig(**cfg, backend="triton")).train()
    ours = af.get_adalora_model(tiny_llama(2).cuda(), af.AdaLoraConfig(**cfg, backend="triton")).train()
    ours.load_state_dict(eager.state_dict())
    counters.clear()
    compiled = torch.compile(ours, mode="reduce-overhead")
    want = _train(eager, eager, 12)
    got = _train(compiled, ours, 12)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert ours.rank_pattern == eager.rank_pattern
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
