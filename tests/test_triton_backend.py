"""Backend "triton" through the layer and the model: dispatch, fallbacks, training parity, compile.

On the CPU the kernels run in Triton's interpreter; on a GPU (``TRITON_INTERPRET=0``) compiled.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _models import max_rel_err
from conftest import LLAMA_PROJ, kernel_devices, tiny_llama
from torch import nn

import adalora_fast as af
from adalora_fast import backend
from adalora_fast.layer import SVDLinear

pytest.importorskip("adalora_fast.kernels.svd_linear")
DEVICES = kernel_devices()


def _layer(backend: str, device: str, *, dropout: float = 0.0, dtype=torch.float32) -> SVDLinear:
    torch.manual_seed(0)
    base = nn.Linear(40, 24).to(dtype)
    layer = SVDLinear(base, 6, 8.0, dropout, init_r=8, backend=backend).to(device)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.normal_()
    return layer


@pytest.mark.parametrize("device", DEVICES)
def test_layer_triton_matches_torch(device):
    fused, plain = _layer("triton", device), _layer("torch", device)
    x = torch.randn(3, 11, 40, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the fused op really runs
        y = fused(x)
    y_ref = plain(x2)
    assert max_rel_err(y, y_ref) <= 1e-5
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert max_rel_err(x.grad, x2.grad) <= 1e-5
    for name in ("lora_A", "lora_E", "lora_B"):
        assert max_rel_err(getattr(fused, name).grad, getattr(plain, name).grad) <= 1e-5, name
    assert fused.base_layer.weight.grad is None  # frozen; a standalone layer leaves its bias trainable
    assert max_rel_err(fused.base_layer.bias.grad, plain.base_layer.bias.grad) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_only_in_training_mode(device):
    layer = _layer("triton", device, dropout=0.5)
    x = torch.randn(9, 40, device=device)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))  # eval: no dropout, deterministic
    layer.train()
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))  # train: a fresh mask per call


@pytest.mark.parametrize("device", DEVICES)
def test_fallbacks_warn_once_and_stay_exact(device):
    layer = _layer("triton", device)
    layer.base_layer.weight.requires_grad_(True)  # the fused op has no weight gradient
    x = torch.randn(5, 40, device=device)
    with pytest.warns(UserWarning, match="base weight requires grad"):
        y = layer(x)
    assert max_rel_err(y, _layer("torch", device)(x)) <= 1e-6
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.double()  # input dtype != weight dtype: the torch path decides (nn.Linear raises)
    with pytest.warns(UserWarning, match="differs from the base weight"), pytest.raises(RuntimeError):
        layer(x)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_takes_the_torch_path(device):
    fused, plain = _layer("triton", device), _layer("torch", device)
    x = torch.randn(5, 40, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="autocast"):
            y = fused(x)
        y_ref = plain(x)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)


def test_auto_uses_torch_on_cpu():
    assert backend.resolve("svd_linear", "auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setattr(backend, "_WARNED", set())
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
        assert backend.resolve("svd_linear", "triton", torch.device("cpu")) == "torch"


def _train(backend: str, device: str, steps: int, batches) -> tuple[list[float], list[dict]]:
    base = tiny_llama(1, hidden=32, intermediate=48, seed=0).to(device)
    cfg = af.AdaLoraConfig(
        init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=steps, lora_alpha=16,
        target_modules=LLAMA_PROJ, backend=backend,
    )  # fmt: skip
    torch.manual_seed(1)
    model = af.get_adalora_model(base, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses, patterns = [], []
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
        patterns.append(copy.deepcopy(model.rank_pattern))
    return losses, patterns


@pytest.mark.parametrize("device", DEVICES)
def test_training_run_matches_torch_backend(device):
    steps = 10
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(steps)]
    fused_losses, fused_patterns = _train("triton", device, steps, batches)
    torch_losses, torch_patterns = _train("torch", device, steps, batches)
    for a, b in zip(fused_losses, torch_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (fused_losses, torch_losses)
    assert fused_patterns == torch_patterns
    final = fused_patterns[-1]
    assert sum(sum(v) for v in final.values()) == 2 * len(final)  # target_r x matrices kept


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    base = tiny_llama(1, hidden=32, intermediate=48, seed=0).to(device)
    cfg = af.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=LLAMA_PROJ, backend="triton")
    model = af.get_adalora_model(base, cfg)
    for _, layer in model.adapted_layers:
        with torch.no_grad():
            layer.lora_E.normal_()
    ids = torch.randint(0, 64, (2, 8), device=device)
    eager = model(input_ids=ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model.model, fullgraph=True)  # fullgraph: any graph break is an error
    out = compiled(input_ids=ids).logits
    assert max_rel_err(out, eager) <= 1e-5
    out.float().pow(2).mean().backward()
    assert all(layer.lora_A.grad is not None for _, layer in model.adapted_layers)


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in DEVICES, reason="CUDA graphs need compiled kernels on CUDA")
def test_cuda_graph_capture_of_forward_and_backward():
    layer = _layer("triton", "cuda", dtype=torch.bfloat16)  # bf16 base, fp32 adapters
    x = torch.randn(64, 40, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [layer.lora_A, layer.lora_E, layer.lora_B]

    def step():
        for p in params:
            p.grad = None
        y = layer(x)
        y.float().sum().backward()
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: autotuning and allocator pools outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    eager_y = step().detach().clone()
    eager_grads = [p.grad.clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph):
        y_static = layer(x)
        y_static.float().sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, eager_y)
    for p, g in zip(params, eager_grads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-6)
