"""File helpers shared by the checkpoint writers: digests, CPU copies."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def file_digest(path: Path) -> str:
    """SHA-256 of a file: ties the training state to the adapter weights it was saved with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares no storage with ``t`` (safetensors refuses shared storage)."""
    return t.detach().to("cpu").contiguous().clone()
