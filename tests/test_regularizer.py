"""Orthogonal regulariser: value and gradients vs the reference in float64, orthonormal zeros, loss wiring."""

from __future__ import annotations

import pytest
import torch
from _models import max_rel_err, tiny_gpt2, tiny_llama

import adalora_fast as af
from adalora_fast import reference

# (r, d_in, d_out) per layer: several shapes, repeated shapes (batched groups), rank-0 layers.
MIXED = [
    (12, 32, 32),
    (12, 32, 16),
    (12, 32, 32),
    (3, 7, 5),
    (12, 48, 32),
    (0, 33, 17),
    (12, 32, 16),
    (1, 33, 1),
    (3, 7, 5),
    (0, 7, 5),
    (5, 3, 40),  # r > d_in: A A^T cannot be the identity
]


def random_factors(shapes, seed, scale=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    As = [(torch.randn(r, d_in, generator=g) * scale).to(dtype) for r, d_in, _ in shapes]
    Bs = [(torch.randn(d_out, r, generator=g) * scale).to(dtype) for r, _, d_out in shapes]
    return As, Bs


def float64_value_and_grads(As, Bs):
    A64 = [a.detach().double().requires_grad_() for a in As]
    B64 = [b.detach().double().requires_grad_() for b in Bs]
    value = reference.orth_regularization(A64, B64)
    grads = torch.autograd.grad(value, A64 + B64, allow_unused=True)
    return value.detach(), grads


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


def orthonormal_factors(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    As, Bs = [], []
    for r, d_in, d_out in shapes:
        qa, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))
        qb, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))
        As.append(qa.T.contiguous().float())  # r x d_in, orthonormal rows
        Bs.append(qb.float())  # d_out x r, orthonormal columns
    return As, Bs


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


# ---- model wiring -------------------------------------------------------------------------------------
def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=g))
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)


def test_model_orth_regularization_matches_reference():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig())
    _randomise(model, 7)
    layers = [m for _, m in model.adapted_layers]
    As, Bs = [m.lora_A for m in layers], [m.lora_B for m in layers]
    got = model.orth_regularization()
    assert max_rel_err(got, reference.orth_regularization(As, Bs)) <= 1e-6
    expected64, ref_grads = float64_value_and_grads(As, Bs)
    assert max_rel_err(got, expected64) <= 1e-6
    got.backward()
    for p, exp in zip(As + Bs, ref_grads, strict=True):
        assert max_rel_err(p.grad, exp) <= 1e-5


@pytest.mark.parametrize("weight", [0.5, 0.1, 2.0])
def test_loss_includes_weighted_regulariser(weight):
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(orth_reg_weight=weight))
    _randomise(model, 8)
    torch.manual_seed(9)
    ids = torch.randint(0, 64, (2, 9))
    base_loss = model.model(input_ids=ids, labels=ids).loss
    reg = reference.orth_regularization(
        [m.lora_A for _, m in model.adapted_layers], [m.lora_B for _, m in model.adapted_layers]
    )
    assert reg.item() > 0.1
    expected = base_loss + weight * reg
    out = model(input_ids=ids, labels=ids)
    assert abs(out.loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    # the loss gradient includes the regulariser's
    out.loss.backward()
    assert all(m.lora_A.grad is not None for _, m in model.adapted_layers)


def test_tuple_outputs_get_the_regulariser():
    weight = 0.5
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(orth_reg_weight=weight))
    _randomise(model, 10)
    ids = torch.randint(0, 64, (2, 9))
    base_loss = model.model(input_ids=ids, labels=ids).loss
    expected = base_loss + weight * model.orth_regularization()
    out = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple)
    assert abs(out[0].item() - expected.item()) <= 1e-6 * abs(expected.item())
    # the logits are untouched
    assert torch.equal(out[1], model(input_ids=ids).logits)


def test_gpt2_loss_includes_regulariser():
    model = af.get_adalora_model(tiny_gpt2(), af.AdaLoraConfig())
    _randomise(model, 11)
    ids = torch.randint(0, 64, (2, 9))
    expected = model.model(input_ids=ids, labels=ids).loss + 0.5 * model.orth_regularization()
    got = model(input_ids=ids, labels=ids).loss
    assert abs(got.item() - expected.item()) <= 1e-6 * abs(expected.item())


def test_zero_weight_leaves_loss_unchanged():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(orth_reg_weight=0.0))
    _randomise(model, 12)
    ids = torch.randint(0, 64, (2, 9))
    base_loss = model.model(input_ids=ids, labels=ids).loss
    assert torch.equal(model(input_ids=ids, labels=ids).loss, base_loss)
    assert torch.equal(model(input_ids=ids, labels=ids, return_dict=False)[0], base_loss)


def test_no_labels_no_loss():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig())
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids)
    assert out.loss is None
    out_t = model(input_ids=ids, return_dict=False)
    assert torch.equal(out_t[0], out.logits)
