"""Tiny transformers models built from configs (no downloads) and numeric helpers for the unit tests."""

from __future__ import annotations

import torch
from conftest import LLAMA_PROJ, tiny_gpt2, tiny_llama  # noqa: F401  (one builder for all tests)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return BertModel(cfg, add_pooling_layer=True).eval()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    expected = expected.detach().to(torch.float64)
    diff = (actual.detach().to(torch.float64) - expected).abs().max()
    scale = expected.abs().max()
    assert scale > 0, "reference is all zeros: the comparison would be vacuous"
    return (diff / scale).item()
