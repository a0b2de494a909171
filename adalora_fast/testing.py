"""Comparison helpers shared by the test suite and the benchmarks' correctness checks."""

from __future__ import annotations

import torch


def max_rel_err(
    actual: torch.Tensor | None, expected: torch.Tensor | None, *, zero_reference_ok: bool = False
) -> float:
    """``max |actual - expected| / max |expected|``, computed in float64.

    ``inf`` when ``actual`` or ``expected`` is missing or the shapes differ; 0 for empty tensors; NaN
    anywhere propagates (and fails any ``<=`` check). An all-zero ``expected`` would make the
    comparison vacuous: it fails an assertion, unless ``zero_reference_ok`` (then any difference is
    ``inf`` and equality 0)."""
    if actual is None or expected is None or actual.shape != expected.shape:
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    expected = expected.detach().to(torch.float64)
    diff = (actual.detach().to(torch.float64) - expected).abs().max()
    scale = expected.abs().max()
    if scale == 0:
        assert zero_reference_ok, "reference is all zeros: the comparison would be vacuous"
        return 0.0 if diff == 0 else float("inf")
    return (diff / scale).item()
