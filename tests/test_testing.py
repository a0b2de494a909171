"""adalora_fast/testing.py: the helpers the tests and benchmarks rely on must themselves be right."""

from __future__ import annotations

import math

import pytest
import torch

from adalora_fast.testing import max_rel_err, random_llama


def test_max_rel_err_is_relative_to_the_largest_reference_entry():
    expected = torch.tensor([4.0, -2.0, 0.0])
    assert max_rel_err(expected.clone(), expected) == 0.0
    assert max_rel_err(torch.tensor([4.0, -2.0, 1.0]), expected) == pytest.approx(0.25)
    assert max_rel_err(torch.tensor([4.0, -2.0, 1.0], dtype=torch.float16), expected) == pytest.approx(0.25)


def test_max_rel_err_cannot_pass_vacuously():
    x = torch.ones(3)
    assert max_rel_err(None, x) == math.inf
    assert max_rel_err(x, None) == math.inf
    assert max_rel_err(torch.ones(2), x) == math.inf
    assert not max_rel_err(torch.tensor([1.0, math.nan, 1.0]), x) <= 1.0
    with pytest.raises(AssertionError, match="vacuous"):
        max_rel_err(torch.zeros(3), torch.zeros(3))
    assert max_rel_err(torch.zeros(3), torch.zeros(3), zero_reference_ok=True) == 0.0
    assert max_rel_err(torch.ones(3), torch.zeros(3), zero_reference_ok=True) == math.inf


def test_random_llama_is_one_set_of_weights_per_seed():
    pytest.importorskip("transformers")
    a, b, c = random_llama(seed=3), random_llama(seed=3), random_llama(seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 32


def test_random_llama_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="hidden=30, heads=4"):
        random_llama(hidden=30)
