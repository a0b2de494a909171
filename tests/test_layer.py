"""SVDLinear: the dense formula in float64, gradients, masking, scaling, PEFT init parity, dtypes, dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import adalora_fast as af
from adalora_fast.layer import SVDLinear
from adalora_fast.testing import max_rel_err
from tests.helpers import LLAMA_PROJ, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

EPS = 1e-5
ALPHA = 8.0


def make_layer(d_in, d_out, r, *, bias=True, conv1d=False, alpha=ALPHA, dropout=0.0, init_r=None):
    """An SVDLinear on a random base with random non-zero A, E, B (fp32)."""
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        base.weight.normal_()
        if base.bias is not None:
            base.bias.normal_()
    layer = SVDLinear(base, r, alpha, dropout, init_r=init_r)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_E.normal_()
        layer.lora_B.normal_()
    return layer


def linear_weight(layer: SVDLinear) -> torch.Tensor:
    """The base weight as (d_out, d_in), float64."""
    w = layer.base_layer.weight.detach().to(torch.float64)
    return w.T if layer.fan_in_fan_out else w


def dense_ref(x, W, b, A, E, B, alpha, init_r):
    """y = x W^T + b + x (B diag(E) A)^T * alpha / (init_r + 1e-5), in the dtype of the inputs."""
    dW = B @ torch.diag(E.view(-1)) @ A
    y = x @ W.T + x @ dW.T * (alpha / (init_r + EPS))
    return y if b is None else y + b


def layer_ref(layer: SVDLinear, x: torch.Tensor, alpha=None, x_adapter=None) -> torch.Tensor:
    """The float64 dense formula for ``layer`` (optionally with a separately dropped-out adapter input)."""
    d = torch.float64
    W = linear_weight(layer)
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().to(d)
    A, E, B = (p.detach().to(d) for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    alpha = layer.lora_alpha if alpha is None else alpha
    x = x.detach().to(d)
    y = dense_ref(x, W, b, A, E, B, alpha, layer.init_r)
    if x_adapter is not None:  # base on x, adapter on x_adapter
        xa = x_adapter.detach().to(d)
        dW = B @ torch.diag(E.view(-1)) @ A
        y = y - x @ dW.T * (alpha / (layer.init_r + EPS)) + xa @ dW.T * (alpha / (layer.init_r + EPS))
    return y


def x_shape(kind: str, d_in: int) -> tuple[int, ...]:
    return {"2d": (7, d_in), "2d-1row": (1, d_in), "3d": (2, 5, d_in)}[kind]


# ---- model level: identity at init ---------------------------------------------------------------
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_zero_E_at_init_gives_base_output_exactly(builder):
    base = builder()
    adapted = af.get_adalora_model(copy.deepcopy(base), af.AdaLoraConfig())
    for _, layer in adapted.adapted_layers:
        assert torch.count_nonzero(layer.lora_E) == 0
        assert torch.count_nonzero(layer.lora_A) > 0 and torch.count_nonzero(layer.lora_B) > 0
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        got = adapted(input_ids=ids).logits
    assert torch.equal(got, expected)


# ---- forward: dense formula ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["2d", "2d-1row", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("r", [1, 3, 12])
@pytest.mark.parametrize("d_in, d_out", [(7, 5), (7, 17), (33, 5), (33, 17)])
def test_forward_matches_dense_formula(d_in, d_out, r, bias, kind):
    torch.manual_seed(1000 * d_in + 10 * d_out + r)
    layer = make_layer(d_in, d_out, r, bias=bias)
    x = torch.randn(x_shape(kind, d_in))
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], d_out)
    assert max_rel_err(y, layer_ref(layer, x)) <= 1e-5


@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("r", [1, 3, 12])
@pytest.mark.parametrize("d_in, d_out", [(7, 5), (33, 17), (7, 17)])
def test_conv1d_forward_matches_dense_formula(d_in, d_out, r, kind):
    torch.manual_seed(2000 * d_in + 10 * d_out + r)
    layer = make_layer(d_in, d_out, r, conv1d=True)
    assert layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (d_in, d_out)
    assert layer.lora_A.shape == (r, d_in) and layer.lora_B.shape == (d_out, r)
    x = torch.randn(x_shape(kind, d_in))
    y = layer(x)
    assert y.shape == (*x.shape[:-1], d_out)
    assert max_rel_err(y, layer_ref(layer, x)) <= 1e-5


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_get_delta_weight_in_base_layout(conv1d):
    torch.manual_seed(5)
    layer = make_layer(33, 17, 3, conv1d=conv1d)
    A, E, B = (p.detach().double() for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    dW = B @ torch.diag(E.view(-1)) @ A * (ALPHA / (3 + EPS))
    expected = dW.T if conv1d else dW
    got = layer.get_delta_weight()
    assert got.shape == layer.base_layer.weight.shape
    assert max_rel_err(got, expected) <= 1e-5


# ---- backward --------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("r", [1, 3, 12])
@pytest.mark.parametrize("d_in, d_out", [(7, 5), (33, 17)])
def test_gradients_match_float64(d_in, d_out, r, kind, conv1d):
    torch.manual_seed(3000 * d_in + 10 * d_out + r)
    layer = make_layer(d_in, d_out, r, conv1d=conv1d)
    x = torch.randn(x_shape(kind, d_in), requires_grad=True)
    g = torch.randn(*x.shape[:-1], d_out)
    params = [layer.lora_A, layer.lora_E, layer.lora_B]
    grads = torch.autograd.grad((layer(x) * g).sum(), [*params, x])

    d = torch.float64
    ref_params = [p.detach().to(d).requires_grad_() for p in params]
    x64 = x.detach().to(d).requires_grad_()
    b = layer.base_layer.bias
    y64 = dense_ref(x64, linear_weight(layer), None if b is None else b.detach().to(d), *ref_params, ALPHA, r)
    ref_grads = torch.autograd.grad((y64 * g.to(d)).sum(), [*ref_params, x64])
    for name, got, exp in zip(("A", "E", "B", "x"), grads, ref_grads, strict=True):
        assert got.shape == exp.shape
        assert max_rel_err(got, exp) <= 1e-5, name


def test_base_weight_gets_no_grad():
    torch.manual_seed(7)
    for conv1d in (False, True):
        layer = make_layer(33, 17, 3, conv1d=conv1d)
        assert not layer.base_layer.weight.requires_grad
        layer(torch.randn(4, 33)).square().sum().backward()
        assert layer.base_layer.weight.grad is None
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0
        assert layer.ranknum.grad is None and not layer.ranknum.requires_grad


def test_model_trains_only_adapters():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig())
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.normal_()
    ids = torch.randint(0, 64, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        is_adapter = any(k in name for k in ("lora_A", "lora_E", "lora_B"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name


# ---- masking and scaling ---------------------------------------------------------------------------
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_masked_ranks_contribute_nothing(conv1d):
    torch.manual_seed(11)
    r, masked = 6, [0, 2, 5]
    layer = make_layer(33, 17, r, conv1d=conv1d)
    kept = [i for i in range(r) if i not in masked]
    with torch.no_grad():
        layer.lora_E[masked] = 0.0
    x = torch.randn(2, 5, 33)
    y = layer(x)

    # equals the formula with only the kept ranks (and the scale of init_r, not of the kept count)
    d = torch.float64
    A, E, B = (p.detach().to(d) for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    b = layer.base_layer.bias.detach().to(d)
    expected = dense_ref(x.to(d), linear_weight(layer), b, A[kept], E[kept], B[:, kept], ALPHA, r)
    assert max_rel_err(y, expected) <= 1e-5

    # whatever A and B hold in the masked ranks changes nothing
    with torch.no_grad():
        layer.lora_A[masked] = torch.randn(len(masked), 33) * 100
        layer.lora_B[:, masked] = torch.randn(17, len(masked)) * 100
    y2 = layer(x)
    assert torch.equal(y2, y)

    # masked ranks get no gradient through A and B (E still gets one, so they can revive)
    y2.square().sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad[masked]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, masked]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[kept]) > 0
    assert torch.count_nonzero(layer.lora_E.grad[masked]) == len(masked)


@pytest.mark.parametrize("alpha", [0, -4])
def test_nonpositive_lora_alpha_scales_by_init_r(alpha):
    torch.manual_seed(13)
    layer = make_layer(7, 5, 3, alpha=alpha)
    assert layer.scaling == 3.0
    x = torch.randn(4, 7)
    assert max_rel_err(layer(x), layer_ref(layer, x, alpha=3.0)) <= 1e-5


def test_nonpositive_lora_alpha_uses_init_r_not_current_r():
    torch.manual_seed(14)
    layer = make_layer(7, 5, 3, alpha=0, init_r=5)
    assert layer.scaling == 5.0 and layer.ranknum.item() == 5.0
    x = torch.randn(4, 7)
    assert max_rel_err(layer(x), layer_ref(layer, x, alpha=5.0)) <= 1e-5


def test_model_nonpositive_lora_alpha():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=0))
    for _, layer in model.adapted_layers:
        assert layer.scaling == 6.0
        assert layer.ranknum.item() == 6.0


def test_ranknum_is_init_r_and_frozen():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(init_r=5, target_r=2, lora_alpha=16))
    for _, layer in model.adapted_layers:
        assert layer.ranknum.item() == 5.0 and not layer.ranknum.requires_grad
        assert layer.scaling == 16


# ---- PEFT init parity -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", [1, 42])
def test_same_seed_same_init_as_peft(seed, dtype):
    base = tiny_llama(seed=0).to(dtype)
    peft_base, our_base = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(peft_base, peft.AdaLoraConfig(total_step=10, target_modules=LLAMA_PROJ))
    torch.manual_seed(seed)
    ours = af.get_adalora_model(our_base, af.AdaLoraConfig(target_modules=LLAMA_PROJ))
    theirs = dict(pm.named_parameters())
    assert len(ours.adapted_layers) == 14
    for name, layer in ours.adapted_layers:
        for kind in ("lora_A", "lora_E", "lora_B"):
            p = theirs[f"base_model.model.{name}.{kind}.default"]
            ours_p = getattr(layer, kind)
            assert ours_p.dtype == p.dtype == torch.float32, (name, kind)
            assert torch.equal(ours_p, p), (name, kind)


# ---- dtypes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "base_dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)], ids=["bf16", "fp16"]
)
def test_half_base_fp32_adapters(base_dtype, tol):
    torch.manual_seed(17)
    base = nn.Linear(33, 17).to(base_dtype)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    layer = SVDLinear(base, 3, ALPHA)
    for p in (layer.lora_A, layer.lora_E, layer.lora_B, layer.ranknum):
        assert p.dtype == torch.float32
    # initial values are base-dtype rounded (PEFT casts down, then up)
    for p in (layer.lora_A, layer.lora_B):
        assert torch.equal(p, p.to(base_dtype).to(torch.float32))
    assert layer.base_layer.weight.dtype == base_dtype
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(2, 5, 33).to(base_dtype)
    y = layer(x)
    assert y.dtype == base_dtype
    assert max_rel_err(y, layer_ref(layer, x)) <= tol
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_bf16_model_output_dtype():
    base = tiny_llama().to(torch.bfloat16)
    model = af.get_adalora_model(base, af.AdaLoraConfig())
    for _, layer in model.adapted_layers:
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.lora_E.dtype == torch.float32
        assert layer.base_layer.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 9))
    assert model(input_ids=ids).logits.dtype == torch.bfloat16


# ---- dropout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dropout_train_mode_matches_formula_with_same_mask(conv1d):
    p = 0.4
    torch.manual_seed(19)
    layer = make_layer(33, 17, 4, conv1d=conv1d, dropout=p).train()
    x = torch.randn(3, 6, 33)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_drop = torch.nn.functional.dropout(x.to(layer.lora_A.dtype), p=p, training=True)
    assert torch.count_nonzero(x_drop == 0) > 0  # the mask really drops something
    assert max_rel_err(y, layer_ref(layer, x, x_adapter=x_drop)) <= 1e-5
    assert max_rel_err(y, layer_ref(layer, x)) > 1e-3  # and differs from no dropout

    # eval mode: no dropout
    layer.eval()
    assert max_rel_err(layer(x), layer_ref(layer, x)) <= 1e-5


# ---- property test ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    r=st.integers(1, 16),
    bias=st.booleans(),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_formula_property(rows, d_in, d_out, r, bias, conv1d, seed):
    torch.manual_seed(seed)
    layer = make_layer(d_in, d_out, r, bias=bias or conv1d, conv1d=conv1d)
    x = torch.randn(rows, d_in)
    y = layer(x)
    expected = layer_ref(layer, x)
    # relative to the magnitude of the summed terms (robust to cancellation in tiny outputs)
    d = torch.float64
    A, E, B = (p.detach().to(d) for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    dW = (B.abs() @ torch.diag(E.abs().view(-1)) @ A.abs()) * (ALPHA / (r + EPS))
    scale = x.to(d).abs() @ (linear_weight(layer).abs() + dW).T
    if layer.base_layer.bias is not None:
        scale = scale + layer.base_layer.bias.detach().to(d).abs()
    err = (y.to(d) - expected).abs().max()
    assert err <= 1e-5 * scale.max()


def test_float64_base_gets_float64_adapters():
    import adalora_fast as af
    from adalora_fast.layer import SVDLinear

    layer = SVDLinear(torch.nn.Linear(5, 3).double(), r=2, lora_alpha=8)
    assert layer.lora_A.dtype == layer.lora_E.dtype == layer.lora_B.dtype == torch.float64
    assert af.SVDLinear is SVDLinear
