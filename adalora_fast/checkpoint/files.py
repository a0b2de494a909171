"""File helpers shared by the checkpoint writers: atomic replacement, digests, CPU copies."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place (a crash leaves
    the old file, never half a new one; the temporary file is removed on errors)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
