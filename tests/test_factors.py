"""adalora_fast/factors.py: the adapter vocabulary (shapes, scale numerator, rank-pattern expansion)."""

from __future__ import annotations

import pytest
import torch

from adalora_fast.factors import (
    FACTORS,
    RANK_DIMS,
    check_factor_shapes,
    expand_pattern,
    factor_shapes,
    missing_grad_error,
    scale_numerator,
)
from adalora_fast.layer import SVDLinear


def test_factor_shapes_and_rank_dims_describe_a_real_layer():
    layer = SVDLinear(torch.nn.Linear(7, 5), r=3, lora_alpha=4.0)
    shapes = factor_shapes(3, 7, 5)
    assert tuple(shapes) == FACTORS
    for kind, dim in RANK_DIMS:
        p = getattr(layer, kind)
        assert tuple(p.shape) == shapes[kind], kind
        assert p.shape[dim] == 3, f"{kind} indexes the ranks on dim {dim}"
    assert check_factor_shapes({k: getattr(layer, k) for k in FACTORS}, 7, 5, "layer") == 3


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"lora_A": torch.zeros(3, 7), "lora_E": torch.zeros(3, 1)}, "'m' has no lora_B"),
        (
            {"lora_A": torch.zeros(3, 7), "lora_E": torch.zeros(3, 1), "lora_B": torch.zeros(5, 2)},
            r"'m': lora_B has shape \(5, 2\), the model needs \(5, 3\)",
        ),
        (
            {"lora_A": torch.zeros(3, 6), "lora_E": torch.zeros(3, 1), "lora_B": torch.zeros(5, 3)},
            r"lora_A has shape \(3, 6\), the model needs \(3, 7\) \(d_in=7, d_out=5, r=3\)",
        ),
    ],
    ids=["missing", "rank-mismatch", "d_in-mismatch"],
)
def test_check_factor_shapes_names_the_place_and_the_factor(tensors, message):
    with pytest.raises(ValueError, match=message):
        check_factor_shapes(tensors, 7, 5, "file: module 'm'")


def test_scale_numerator_is_peft_alpha_or_init_r():
    assert scale_numerator(8.0, 12) == 8.0
    assert scale_numerator(0, 12) == 12.0
    assert scale_numerator(-1.0, 6) == 6.0


def test_expand_pattern_spreads_the_keep_mask_over_the_held_positions():
    assert expand_pattern(None, [True, False, True], 5) == [True, False, True, False, False]
    held = [False, True, True, False, True]
    assert expand_pattern(held, [True, False, True], 5) == [False, True, False, False, True]
    assert sum(expand_pattern(held, [True, True, True], 5)) == sum(held)


def test_missing_grad_error_names_the_factor_and_the_call_order():
    err = missing_grad_error("model.layers.0.q_proj", "lora_E")
    assert isinstance(err, RuntimeError)
    assert "model.layers.0.q_proj.lora_E has no gradient" in str(err)
    assert "before zero_grad()" in str(err)
