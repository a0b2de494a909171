"""Shared fixtures: tiny transformers models built from configs (no downloads)."""

from __future__ import annotations

import os

# Kernel modules read this at import time; the CPU test suite runs Triton kernels in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(num_layers: int = 2, hidden: int = 32, intermediate: int = 48, vocab: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(num_layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32, n_layer=num_layers, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def batches(n: int, vocab: int = 64, batch: int = 2, seq: int = 9, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


@pytest.fixture
def llama_factory():
    return tiny_llama


def kernel_devices() -> list[str]:
    """Where the Triton kernels run in this session: the interpreter's CPU, or CUDA when compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


@pytest.fixture
def poison_empty(monkeypatch):
    """``torch.empty`` hands out poisoned memory (NaN / -7), so kernels must write every output element."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", empty)
