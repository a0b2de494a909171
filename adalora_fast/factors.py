"""The vocabulary of an AdaLoRA adapter, defined once (``docs/numeric_contract.md`` §1, §3).

Factors (PEFT's names; the paper's letters): ``lora_A`` = Q (r x d_in), ``lora_E`` = λ (r x 1),
``lora_B`` = P (d_out x r); the update is ``B diag(E) A * scale`` with
``scale = scale_numerator / (ranknum + RANKNUM_EPS)`` and ``ranknum == init_r`` for ever.

Ranks, in the words the code uses:

- **init_r**: the ranks every layer starts with.
- **held ranks**: the ranks a layer's factors hold now (``layer.r``): init_r, unless the layer was
  loaded pruned or compacted.
- **held pattern**: which of the init_r positions a pruned or compacted layer holds (one bool per
  init_r position; ``None`` while it holds all of them).
- **keep mask**: the allocator's current mask, one bool per held rank (False: λ is zeroed).
- **rank pattern**: one bool per init_r position: PEFT's ``rank_pattern`` (a keep mask spread over
  the held pattern).
- **kept rank**: the number of True entries of a rank pattern.

Imports nothing of the package but the kernels' shared constants (which import no Triton).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from .kernels.constants import MAX_RANK, RANKNUM_EPS, SUPPORTED_DTYPES

__all__ = [
    "FACTORS",
    "MAX_RANK",
    "RANKNUM_EPS",
    "RANK_DIMS",
    "SUPPORTED_DTYPES",
    "AdapterLayer",
    "check_factor_shapes",
    "expand_pattern",
    "factor_shapes",
    "missing_grad_error",
    "scale_numerator",
]

FACTORS = ("lora_A", "lora_E", "lora_B")
# The dimension of each factor that indexes the ranks.
RANK_DIMS = (("lora_A", 0), ("lora_E", 0), ("lora_B", 1))


class AdapterLayer(Protocol):
    """What the allocator, compaction and checkpoint code need of an adapted layer (``SVDLinear``
    satisfies it): its factors as ordinary ``nn.Parameter`` s, its sizes and its held pattern."""

    lora_A: torch.nn.Parameter
    lora_E: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    in_features: int
    out_features: int
    init_r: int
    r: int
    held_pattern: list[bool] | None
    _parameters: dict[str, torch.nn.Parameter | None]

    def select_ranks_(self, keep: Sequence[bool]) -> None: ...


def scale_numerator(lora_alpha: float, init_r: int) -> float:
    """PEFT's numerator of the adapter scale: ``lora_alpha``, or ``init_r`` when ``lora_alpha <= 0``."""
    return lora_alpha if lora_alpha > 0 else float(init_r)


def factor_shapes(r: int, d_in: int, d_out: int) -> dict[str, tuple[int, int]]:
    """The shapes of A, E, B at rank ``r`` for a ``d_in -> d_out`` layer."""
    return {"lora_A": (r, d_in), "lora_E": (r, 1), "lora_B": (d_out, r)}


def check_factor_shapes(tensors: Mapping[str, torch.Tensor | None], d_in: int, d_out: int, where: str) -> int:
    """The rank of a layer's factors ``{"lora_A", "lora_E", "lora_B": tensor}``; ``ValueError`` naming
    ``where`` (e.g. "<file>: module 'x'") if one is missing or does not fit ``d_in -> d_out``."""
    for kind in FACTORS:
        if tensors.get(kind) is None:
            raise ValueError(f"{where} has no {kind}")
    r = tensors["lora_A"].shape[0]
    for kind, shape in factor_shapes(r, d_in, d_out).items():
        got = tuple(tensors[kind].shape)
        if got != shape:
            raise ValueError(
                f"{where}: {kind} has shape {got}, the model needs {shape} "
                f"(d_in={d_in}, d_out={d_out}, r={r})"
            )
    return r


def expand_pattern(held: Sequence[bool] | None, keep: Sequence[bool], init_r: int) -> list[bool]:
    """A layer's rank pattern (init_r bools) from its keep mask over the held ranks: ``keep`` fills the
    True positions of the held pattern ``held`` (all init_r positions when ``held`` is None)."""
    if held is None:
        return [bool(k) for k in keep] + [False] * (init_r - len(keep))
    it = iter(keep)
    return [bool(next(it)) if kept else False for kept in held]


def missing_grad_error(name: str, kind: str) -> RuntimeError:
    """The error for an adapter factor without a gradient when the scores are updated."""
    return RuntimeError(
        f"{name}.{kind} has no gradient: call update_and_allocate after backward() and optimizer.step(), "
        "before zero_grad()"
    )
