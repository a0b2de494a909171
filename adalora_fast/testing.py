"""Helpers shared by the demo, the test suite and the benchmarks: a randomly initialised Llama built
from its config (no downloads) and the max-relative-error comparison."""

from __future__ import annotations

import torch
from torch import nn


def random_llama(
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 48,
    vocab: int = 64,
    seed: int = 0,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A ``LlamaForCausalLM`` from a ``LlamaConfig`` with random weights drawn after
    ``torch.manual_seed(seed)`` (one seed, one set of weights): a stand-in for a pretrained model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden={hidden}, heads={heads}, kv_heads={kv_heads} do not divide")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


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
