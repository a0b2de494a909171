"""functional.py: the orthogonal regulariser's value and gradients vs the reference in float64 (orthonormal
zeros, rank-0 layers), its compute ops independent of depth, and svd_linear's torch / triton choice through
the layer (the fused op matches the torch path; fallbacks and autocast take the torch path, warned once).

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


@pytest.mark.usefixtures("svd_linear_kernels")
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_takes_the_torch_path(device):
    fused, plain = _layer("triton", device), _layer("torch", device)
    x = torch.randn(5, 40, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="autocast"):
            y = fused(x)
        y_ref = plain(x)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)


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
