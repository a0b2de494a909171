"""The allocator's Triton scorer: every score EMA of the model in a fixed number of launches.

:class:`TritonScorer` is :class:`~adalora_fast.allocator.scorers.FlatScorer` (same E buffer,
same masking, same checkpoint format) with the scoring done by :mod:`adalora_fast.kernels.importance_ema`:
no concatenation of the weights and gradients; the kernels read each parameter and gradient where it
lives, through device tables of data pointers, and update two flat fp32 EMA buffers in place.

The pointer tables are rebuilt only when a pointer changes (new gradients after
``zero_grad(set_to_none=True)`` usually come back at the same addresses from PyTorch's caching
allocator); on CUDA a rebuild is an asynchronous copy from pinned memory, not a host sync.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..factors import FACTORS, AdapterLayer
from ..kernels import importance_ema
from ..kernels._common import table_to_device
from .scorers import FlatScorer, _data_ptr

_is_contiguous = torch.Tensor.is_contiguous


class TritonScorer(FlatScorer):
    """FlatScorer whose EMA update and triplet scores run in the ``importance_ema`` kernels (backend
    "triton"; fp32 adapters, see ``importance_ema.unsupported_reason``)."""

    name = "triton"

    def __init__(self, layers: Sequence[tuple[str, AdapterLayer]], beta1: float, beta2: float, target_r: int):
        self._flat_ipt: torch.Tensor | None = None
        self._flat_unc: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._p_key: list[int] | None = None
        self._g_key: list[int] | None = None
        super().__init__(layers, beta1, beta2, target_r)
        params = self._params()
        layout = importance_ema.layout_table(params, self.r)  # host tensor, built once
        self._offsets_host = layout[:, 0].tolist()
        self._layout = layout.to(self.flat_E.device)
        self._numel = torch.tensor([p.numel() for p in params], device=self.flat_E.device)
        self._flag = torch.zeros((), dtype=torch.int32, device=self.flat_E.device)

    def _params(self) -> list[torch.Tensor]:
        return [p for kind in FACTORS for p in self._kind_params(kind)]

    def _check(self, tensors: Sequence[torch.Tensor | None], what: str) -> None:
        """Raise the clear error for the first parameter (``what`` "") or gradient (".grad") the score
        kernels cannot read: missing, not float32, not contiguous."""
        n = len(self.layers)
        for j, t in enumerate(tensors):
            name, kind = self.names[j % n], FACTORS[j // n]
            if t is None:
                self._grad(name, kind, self._pdicts[j % n][kind])  # raises "... has no gradient"
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise RuntimeError(f"{name}.{kind}{what} must be contiguous float32 for the score kernels")

    def _move_scores(self, device: torch.device) -> None:
        for attr in ("_layout", "_numel", "_flag", "_flat_ipt", "_flat_unc", "_scores"):
            t = getattr(self, attr, None)
            if t is not None and t.device != device:
                setattr(self, attr, t.to(device))

    def _param_table(self) -> torch.Tensor:
        """Device table of the parameters' data pointers, rebuilt (and re-checked) only when one changed."""
        params = self._params()
        key = list(map(_data_ptr, params))
        if key != self._p_key:
            self._check(params, "")
            self._p_table = table_to_device(importance_ema.pointer_table(params), self.flat_E.device)
            self._p_key = key
        return self._p_table

    def _grad_table(self) -> torch.Tensor:
        """Device table of the gradients' data pointers, rebuilt only when one changed.

        Autograd keeps each gradient's dtype and shape equal to its parameter's (checked float32 and
        contiguous with the parameter table), so per call only presence and contiguity are checked,
        with C-level maps: this runs for every adapted matrix on every step.
        """
        grads = [p.grad for p in self._params()]
        try:
            key = list(map(_data_ptr, grads))  # TypeError on a missing gradient
            ok = all(map(_is_contiguous, grads))
        except TypeError:
            ok = False
        if not ok:
            self._check(grads, ".grad")
        if key != self._g_key:
            self._g_table = table_to_device(importance_ema.pointer_table(grads), self.flat_E.device)
            self._g_key = key
        return self._g_table

    def update_scores(self) -> None:
        """One EMA step of every element (skipped on device if any gradient is inf/NaN) + scores."""
        self.bind()
        with torch.no_grad():
            p_table, g_table = self._param_table(), self._grad_table()
            if self._flat_ipt is None:
                n = self._total_elements()
                self._flat_ipt = torch.zeros(n, device=self.flat_E.device)
                self._flat_unc = torch.zeros(n, device=self.flat_E.device)
            self._flag.zero_()
            self._scores = importance_ema.importance_scores_(
                p_table, g_table, self._layout, self._flat_ipt, self._flat_unc,
                self.r, self.beta1, self.beta2, numel_table=self._numel, nonfinite_flag=self._flag,
            )  # fmt: skip
            self.nonfinite_steps.add_(self._flag)

    def _total_elements(self) -> int:
        return sum(p.numel() for p in self._params())  # host arithmetic on shapes, no device read

    @property
    def has_scores(self) -> bool:
        return self._flat_ipt is not None

    def free_scores(self) -> None:
        self._flat_ipt = self._flat_unc = self._scores = None

    def scores(self) -> torch.Tensor:
        """Triplet scores (M, r) of the current EMAs (from the last update, or recomputed after a load)."""
        if self._flat_ipt is None:
            raise RuntimeError("no importance scores yet: update_and_allocate has not run a scoring step")
        if self._scores is None:
            p_table = self._param_table()
            self._scores = importance_ema.importance_scores_(
                p_table, p_table, self._layout, self._flat_ipt, self._flat_unc,
                self.r, self.beta1, self.beta2, update=False,
            )  # fmt: skip
        return self._scores

    # ---- per-layer state (checkpoints): views into the flat buffers, in each parameter's shape --
    def layer_state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self._flat_ipt is None:
            return out
        params = self._params()
        M = len(self.layers)
        for i, p in enumerate(params):
            kind, layer = divmod(i, M)
            off = self._offsets_host[i]
            for tag, buf in (("ema_ipt", self._flat_ipt), ("ema_unc", self._flat_unc)):
                out[f"{self.names[layer]}.{FACTORS[kind]}.{tag}"] = buf[off : off + p.numel()].view(p.shape)
        return out

    def load_layer_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._scores = None
        if not state:
            self._flat_ipt = self._flat_unc = None
            return
        self.bind()
        bufs = {}
        for tag in ("ema_ipt", "ema_unc"):
            parts = [state[f"{name}.{kind}.{tag}"].reshape(-1) for kind in FACTORS for name in self.names]
            bufs[tag] = torch.cat(parts).to(device=self.flat_E.device, dtype=torch.float32)
        self._flat_ipt, self._flat_unc = bufs["ema_ipt"], bufs["ema_unc"]
