"""Which path runs an adapter operation, and why: the one place that decides it.

Operations: ``"svd_linear"`` (the adapted linear layer), ``"orth_reg"`` (the orthogonal regulariser)
and ``"allocator"`` (the importance scorer). Each has a PyTorch path that runs everywhere and a
Triton path in :mod:`adalora_fast.kernels`. Requested backends:

- ``"auto"`` (default): Triton for CUDA tensors, PyTorch otherwise;
- ``"torch"``: always PyTorch;
- ``"triton"``: the kernels; on the CPU they run in Triton's interpreter when ``TRITON_INTERPRET=1``
  was set before the kernels were imported. Where they cannot run, PyTorch runs, with a one-time
  warning saying why.

:func:`resolve` answers from the platform (device, Triton importable, interpreter); :func:`choose`
adds the call's own reason (dtypes, autocast, ...) that the kernel module reports through its
``unsupported_reason`` function. Both are cheap (no imports after the first call, no tensor work).
A leaf module: it imports nothing of the package (the kernels are imported by the op layer itself).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "ADALORA_FAST_BACKEND"  # overrides the config's backend
OPS = ("svd_linear", "orth_reg", "allocator")

_WARNED: set[str] = set()
_TRITON_ERROR: list[str | None] = []  # [] until checked, then [None] or [the import error]


class Choice(NamedTuple):
    """The path that runs (``"torch"`` or ``"triton"``) and, when PyTorch runs where the kernels were
    asked for, why (``None`` otherwise)."""

    backend: str
    reason: str | None = None


def requested_backend(configured: str) -> str:
    """The configured backend, or the ``ADALORA_FAST_BACKEND`` environment variable when set."""
    env = os.environ.get(BACKEND_ENV)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {env!r}")
        return env
    return configured


def warn_once(message: str, stacklevel: int = 3) -> None:
    """``warnings.warn`` once per message (nothing while torch.compile traces: a warning there is a
    graph break, and the eager warm-up already warned)."""
    if torch.compiler.is_compiling():
        return
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget which one-time warnings were given (tests)."""
    _WARNED.clear()


def triton_error() -> str | None:
    """Why Triton cannot be imported on this platform, or None (checked once)."""
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            _TRITON_ERROR.append(f"{type(err).__name__}: {err}")
        else:
            _TRITON_ERROR.append(None)
    return _TRITON_ERROR[0]


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: as the kernel modules decided when they were
    imported, or as they will decide from ``TRITON_INTERPRET`` now."""
    common = sys.modules.get("adalora_fast.kernels._common")
    if common is not None:
        return bool(common.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _platform_reason(op: str, device: torch.device) -> str | None:
    error = triton_error()
    if error is not None:
        return f"(Triton cannot be imported: {error})"
    if device.type != "cuda" and not interpreting():
        return (
            f"on {device.type}: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before the "
            "kernels are imported"
        )
    return None


def resolve(op: str, requested: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device`` under the requested backend, from the
    platform alone; warns once when ``"triton"`` was asked for and cannot run here."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_error() is None else "torch"
    if requested != "triton":
        raise ValueError(f"unknown backend {requested!r}; choose from {BACKENDS}")
    reason = _platform_reason(op, device)
    if reason is not None:
        warn_once(f"backend='triton' for {op!r} {reason}; using the torch implementation")
        return "torch"
    return "triton"


def choose(op: str, requested: str, device: torch.device, unsupported: Callable[[], str | None]) -> Choice:
    """:func:`resolve`, then the kernel's own verdict on this call (``unsupported()``, the kernel
    module's ``unsupported_reason``, asked only when Triton would run). The reason is not warned
    about here: :func:`fall_back` does that where the op runs."""
    if resolve(op, requested, device) == "torch":
        return Choice("torch")
    reason = unsupported()
    return Choice("torch", reason) if reason is not None else Choice("triton")


def fall_back(op: str, reason: str) -> None:
    """The one-time warning for a call the kernels cannot take (PyTorch runs it)."""
    warn_once(f"fused {op} cannot run: {reason}; using the torch path for such calls", stacklevel=4)


def explain(op: str, requested: str, device: torch.device) -> str:
    """A sentence saying which path runs ``op`` on ``device`` and why (benchmarks, logs)."""
    if requested == "torch":
        return f"{op}: torch (requested)"
    if requested == "auto" and device.type != "cuda":
        return f"{op}: torch (auto picks the kernels for CUDA tensors only)"
    reason = _platform_reason(op, device)
    if reason is not None:
        return f"{op}: torch; triton cannot run {reason}"
    where = "Triton's interpreter" if device.type != "cuda" else "compiled Triton kernels"
    return f"{op}: triton ({where})"
