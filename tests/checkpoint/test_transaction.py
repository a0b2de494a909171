"""checkpoint/files.py: checkpoint writes are atomic (a failed write leaves the previous files as they
were)."""

from __future__ import annotations

import os

import pytest
import torch

from adalora_fast.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME
from tests.helpers import checkpoint_model, tiny_llama


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = checkpoint_model(tiny_llama())
    model.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, "README.md"])

    import adalora_fast.checkpoint.peft_format as peft_format

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_A.add_(1.0)
    monkeypatch.setattr(peft_format, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, "README.md"])
