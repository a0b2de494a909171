"""functional.py: the orthogonal regulariser's value and gradients vs the reference in float64 (orthonormal
zeros, rank-0 layers), its compute ops independent of depth, and svd_linear's torch / triton choice through
the layer (the fused op matches the torch path, also under autocast; fallbacks take the torch path,
warned once).

On the CPU the kernels run in Triton's interpreter; on a GPU (``TRITON_INTERPRET=0``) compiled.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adalora_fast as af
from adalora_fast import reference
from adalora_fast.layer import SVDLinear
from adalora_fast.testing import max_rel_err
from tests.helpers import (
    MIXED,
    VIEW_OPS,
    allocator_model,
    aten_ops,
    float64_value_and_grads,
    kernel_devices,
    orthonormal_factors,
    random_factors,
)

DEVICES = kernel_devices()


@pytest.fixture
def svd_linear_kernels():
    """The fused layer's kernels (the torch / triton choice tests skip without them)."""
    return pytest.importorskip("adalora_fast.kernels.svd_linear")


# ---- orth_regularization ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shapes", [MIXED, [(12, 32, 32)] * 5, [(3, 7, 5)]], ids=["mixed", "same", "one"])
def test_value_matches_reference(shapes, seed):
    As, Bs = random_factors(shapes, seed)
    got = af.orth_regularization(As, Bs)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert max_rel_err(got, reference.orth_regularization(As, Bs)) <= 1e-6
    expected64, _ = float64_value_and_grads(As, Bs)
    assert max_rel_err(got, expected64) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shapes", [MIXED, [(12, 32, 32)] * 5], ids=["mixed", "same"])
def test_gradients_match_float64(shapes, seed):
    As, Bs = random_factors(shapes, seed)
    As = [a.requires_grad_() for a in As]
    Bs = [b.requires_grad_() for b in Bs]
    grads = torch.autograd.grad(af.orth_regularization(As, Bs), As + Bs, allow_unused=True)
    _, ref_grads = float64_value_and_grads(As, Bs)
    for i, (got, exp) in enumerate(zip(grads, ref_grads, strict=True)):
        which = f"{'A' if i < len(As) else 'B'}[{i % len(As)}] {shapes[i % len(As)]}"
        if exp is None or exp.numel() == 0:
            assert got is None or got.numel() == 0 or torch.count_nonzero(got) == 0, which
            continue
        assert got is not None and got.shape == exp.shape, which
        assert max_rel_err(got, exp) <= 1e-5, which


def test_rank_zero_layers_count_in_the_mean():
    As, Bs = random_factors([(3, 7, 5)], seed=4)
    one = af.orth_regularization(As, Bs)
    zeros_A, zeros_B = [torch.zeros(0, 9)], [torch.zeros(6, 0)]
    with_empty = af.orth_regularization(As + zeros_A, Bs + zeros_B)
    assert max_rel_err(with_empty, one / 2) <= 1e-6


def test_orthonormal_factors_give_zero():
    shapes = [s for s in MIXED if s[0] <= min(s[1], s[2])]
    As, Bs = orthonormal_factors(shapes, seed=5)
    for a in As:
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-6)
    value = af.orth_regularization(As, Bs)
    assert 0 <= value.item() < 1e-6
    assert reference.orth_regularization(As, Bs).item() < 1e-6


def test_exactly_orthonormal_layer_has_finite_zero_gradient():
    # ||A A^T - I||_F == 0 exactly: the norm's gradient must be 0 there, not NaN
    A = torch.eye(3, 7).requires_grad_()
    B = torch.eye(5, 3).requires_grad_()
    (A2,), (B2,) = random_factors([(3, 7, 5)], seed=13)
    A2.requires_grad_()
    B2.requires_grad_()
    grads = torch.autograd.grad(af.orth_regularization([A, A2], [B, B2]), [A, B, A2, B2])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(grads[0]) == 0 and torch.count_nonzero(grads[1]) == 0


def test_orthonormal_then_perturbed_is_positive():
    As, Bs = orthonormal_factors([(4, 16, 16)] * 3, seed=6)
    As[1] = As[1] + 0.1 * torch.randn_like(As[1])
    value = af.orth_regularization(As, Bs)
    assert value.item() > 1e-3
    assert max_rel_err(value, reference.orth_regularization(As, Bs)) <= 1e-6


def test_empty_raises():
    with pytest.raises((ValueError, IndexError)):
        af.orth_regularization([], [])


def test_regulariser_compute_op_count_independent_of_depth():
    counts = []
    for layers in (2, 8):
        model = allocator_model(layers)

        def fwd_bwd(m=model):
            m.orth_regularization().backward()

        fwd_bwd()  # grads exist: the profiled backward accumulates, as in training
        ops = aten_ops(fwd_bwd)
        counts.append(sum(v for k, v in ops.items() if k not in VIEW_OPS))
    assert counts[0] == counts[1], counts


# ---- svd_linear: the torch / triton choice, through the layer ------------------------------------
def _layer(backend: str, device: str, *, dropout: float = 0.0, dtype=torch.float32) -> SVDLinear:
    torch.manual_seed(0)
    base = nn.Linear(40, 24).to(dtype)
    layer = SVDLinear(base, 6, 8.0, dropout, init_r=8, backend=backend).to(device)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.normal_()
    return layer


@pytest.mark.usefixtures("svd_linear_kernels")
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


@pytest.mark.usefixtures("svd_linear_kernels")
@pytest.mark.parametrize("device", DEVICES)
def test_cublas_gemm_opt_in_matches_the_torch_path(device, monkeypatch):
    """ADALORA_FAST_CUBLAS_GEMM (opt-in): a floating-point base's product by cuBLAS (F.linear), the
    low-rank term added into it by kernels/base_plus_svd.py; y and every gradient as the torch path
    gives them, in fp32 and under fp16 autocast."""
    from adalora_fast.kernels import base_plus_svd

    calls = []
    real = base_plus_svd.base_plus_svd

    def counted(base_out, *args, **kwargs):
        calls.append(base_out._is_view())  # a view would be copied before the in-place add
        return real(base_out, *args, **kwargs)

    monkeypatch.setattr(base_plus_svd, "FLOAT_BASES", True)
    monkeypatch.setattr(base_plus_svd, "base_plus_svd", counted)
    for amp in (None, torch.float16):
        fused, plain = _layer("triton", device), _layer("torch", device)
        x = torch.randn(3, 11, 40, device=device, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        with torch.autocast(device, dtype=amp or torch.float16, enabled=amp is not None):
            y, y_ref = fused(x), plain(x2)
        assert y.dtype == y_ref.dtype == (amp or torch.float32)
        tol = 1e-5 if amp is None else 4e-3  # the torch path rounds the low-rank product to fp16 too
        assert max_rel_err(y, y_ref) <= tol
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        assert max_rel_err(x.grad, x2.grad) <= tol
        for name in ("lora_A", "lora_E", "lora_B"):
            assert max_rel_err(getattr(fused, name).grad, getattr(plain, name).grad) <= tol, name
    assert calls == [False, False]  # 3-D x with a bias: F.linear of 3-D x would have given a view


@pytest.mark.usefixtures("svd_linear_kernels")
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


@pytest.mark.usefixtures("svd_linear_kernels")
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


def _autocast_dtypes(device: str) -> list[torch.dtype]:
    # The interpreter's bf16 tl.dot is wrong: bf16 numerics are checked compiled on a GPU only.
    return [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]


def _count_kernel_calls(monkeypatch, module) -> dict[str, int]:
    calls = {"x_at": 0, "xw_plus_sb": 0, "xt_s": 0}
    for name in calls:
        real = getattr(module, f"launch_{name}")  # the layer's op launches them unchecked

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, f"launch_{name}", counted)
    return calls


def _autocast_reference(layer: SVDLinear, x: torch.Tensor, amp: torch.dtype, factors=None) -> torch.Tensor:
    """float64 of nn.Linear's autocast rule: x, W, b rounded to ``amp``; the adapters as they are
    (``factors``: float64 leaves to take their gradients, else the layer's, detached)."""
    base = layer.base_layer
    x64 = x.to(amp).double()  # differentiable: the x-gradient reference
    w64, b64 = (t.detach().to(amp).double() for t in (base.weight, base.bias))
    A, E, B = factors or (p.detach().double() for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    scale = layer.scaling / (layer.ranknum.double() + 1e-5)
    return x64 @ w64.t() + b64 + scale * ((x64 @ A.t()) * E.t()) @ B.t()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_fused_kernels(device, svd_linear_kernels, monkeypatch):
    for amp in _autocast_dtypes(device):
        fused, plain = _layer("triton", device), _layer("torch", device)
        calls = _count_kernel_calls(monkeypatch, svd_linear_kernels)
        x = torch.randn(3, 11, 40, device=device, requires_grad=True)
        x_plain = x.detach().clone().requires_grad_(True)
        with torch.autocast(device, dtype=amp):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback warning
                y = fused(x)
            y_plain = plain(x_plain)
        assert calls == {"x_at": 1, "xw_plus_sb": 1, "xt_s": 0}
        assert y.dtype == y_plain.dtype == amp
        y64 = _autocast_reference(fused, x, amp)
        assert max_rel_err(y, y64) <= 2e-3  # the output rounded to amp, fp32 accumulation
        assert max_rel_err(y, y_plain) <= 4e-3  # the torch path rounds the low-rank product to amp too
        dy = torch.randn_like(y)
        y.backward(dy)
        y_plain.backward(dy)
        assert calls == {"x_at": 2, "xw_plus_sb": 2, "xt_s": 2}
        assert x.grad.dtype == torch.float32 and fused.lora_A.grad.dtype == torch.float32
        x64 = x.detach().clone().double().requires_grad_(True)
        factors = [
            p.detach().double().requires_grad_(True) for p in (fused.lora_A, fused.lora_E, fused.lora_B)
        ]
        _autocast_reference(fused, x64, amp, factors).backward(dy.double())
        assert max_rel_err(x.grad, x64.grad) <= 4e-3  # dy and W in amp
        for name, p64 in zip(("lora_A", "lora_E", "lora_B"), factors, strict=True):
            assert max_rel_err(getattr(fused, name).grad, p64.grad) <= 4e-3, name  # x, dy in amp
        for name in ("lora_A", "lora_E", "lora_B"):
            assert max_rel_err(getattr(fused, name).grad, getattr(plain, name).grad) <= 1e-2, name
        assert max_rel_err(x.grad, x_plain.grad) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_rule_of_the_custom_ops(device, svd_linear_kernels):
    """Called as torch.ops under autocast, the ops cast x, W and b (not the adapters) as nn.Linear."""
    layer = _layer("torch", device)
    base = layer.base_layer
    x = torch.randn(7, 40, device=device, requires_grad=True)
    adapters = (layer.lora_A, layer.lora_E, layer.lora_B, layer.ranknum)
    seed = torch.empty(1, dtype=torch.int64, device=device)
    with torch.autocast(device, dtype=torch.float16):
        y, s = torch.ops.adalora_fast.svd_linear_fwd(
            x, base.weight, base.bias, *adapters, seed, 0.0, layer.scaling, False
        )
        y_infer = torch.ops.adalora_fast.svd_linear_infer(
            x, base.weight, base.bias, *adapters, layer.scaling, False
        )
    assert y.dtype == y_infer.dtype == torch.float16 and s.dtype == torch.float32
    y64 = _autocast_reference(layer, x, torch.float16)
    assert max_rel_err(y, y64) <= 2e-3 and max_rel_err(y_infer, y64) <= 2e-3
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.usefixtures("svd_linear_kernels")
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
