"""Shared fixtures, and the Triton interpreter as the suite's default. Helpers (tiny models, batches,
devices, PEFT helpers): tests/helpers.py."""

from __future__ import annotations

import os

# Kernel modules read this at import time; the CPU test suite runs Triton kernels in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def llama_factory():
    from tests.helpers import tiny_llama

    return tiny_llama


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
