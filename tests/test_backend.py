"""backend.py: which path runs an op from the platform alone ("auto" is torch on the CPU; "triton" on the
CPU without the interpreter falls back to torch, warned)."""

from __future__ import annotations

import pytest
import torch

from adalora_fast import backend

pytest.importorskip("adalora_fast.kernels.svd_linear")


def test_auto_uses_torch_on_cpu():
    assert backend.resolve("svd_linear", "auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    backend.reset_warnings()
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
        assert backend.resolve("svd_linear", "triton", torch.device("cpu")) == "torch"
