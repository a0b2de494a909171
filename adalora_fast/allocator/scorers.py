"""The allocator's scorers: importance EMAs, triplet scores and keep masks behind one protocol.

Three scorers keep the same per-layer state (so any of them resumes any other's checkpoint):

* :class:`ReferenceScorer` (``name`` "reference"): per layer and readable, on the spec's functions
  (:mod:`adalora_fast.reference`); the only one for layers of different ranks (a pruned PEFT
  checkpoint loaded for training; compacted layers, where it only keeps the books).
* :class:`FlatScorer` (``name`` "torch", the default): all layers at once in a fixed number of ATen
  ops, whatever the depth.
* :class:`~adalora_fast.allocator.triton_scorer.TritonScorer` (``name`` "triton"): the flat scorer with
  the scoring in the ``importance_ema`` kernels.

All skip the score update of a step whose adapter gradients hold inf/NaN (decided on the device,
counted in ``nonfinite_steps``). :func:`~adalora_fast.allocator.rank_allocator.make_scorer` picks one.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import torch

from ..distributed import dtensor_possible, is_dtensor
from ..factors import FACTORS, AdapterLayer, missing_grad_error
from ..reference import grads_finite, kth_smallest, triplet_scores, update_importance_

__all__ = ["CHUNKS", "FlatScorer", "ReferenceScorer", "Scorer", "reject_sharded_adapters"]

# Unbound accessors for C-level ``map`` over one tensor per layer (Python loops there cost ~1 ms a
# call at 224 layers).
_data_ptr = torch.Tensor.data_ptr
_shape = operator.attrgetter("shape")

_Coeffs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
CHUNKS = 8  # runs of layers per kind in a score update: a fixed number, so the op count is depth-free


class Scorer(Protocol):
    """What :class:`~adalora_fast.allocator.RankAllocator` asks of a scorer.

    State in the per-layer format of checkpoints: :meth:`layer_state` gives
    ``{"<module>.<factor>.ema_ipt" | ".ema_unc": tensor in the factor's shape}`` (empty without
    scores), :meth:`keep_by_layer` ``{module: bool tensor, one per held rank}``.
    """

    name: str  # "reference", "torch" or "triton"
    names: list[str]
    init_bgt: int
    target_bgt: int
    nonfinite_steps: torch.Tensor  # 0-d int64 on the adapters' device

    @property
    def has_scores(self) -> bool: ...

    def update_scores(self) -> None: ...

    def mask_to_budget(self, budget: int) -> None: ...

    def apply_keep(self) -> None: ...

    def free_scores(self) -> None: ...

    def keep_by_layer(self) -> dict[str, torch.Tensor]: ...

    def set_keep(self, keep: Mapping[str, torch.Tensor]) -> None: ...

    def layer_state(self) -> dict[str, torch.Tensor]: ...

    def load_layer_state(self, state: Mapping[str, torch.Tensor]) -> None: ...


def untied_threshold(threshold: torch.Tensor, scores: torch.Tensor, budget: int) -> torch.Tensor:
    """PEFT's threshold (ranks with ``score <= threshold`` are masked), except where every score ties
    at it (no score update since the start: all EMAs zero), which would mask every rank whatever the
    budget: then -inf, so that nothing is masked and at least ``budget`` ranks stay. The tie is judged
    on the non-NaN scores (a NaN score is never masked, as in PEFT, and must not hide the others). On
    the device."""
    if budget == 0:
        return threshold
    inf = float("inf")
    top = scores.nan_to_num(nan=-inf, posinf=inf, neginf=-inf).max()
    return torch.where(threshold < top, threshold, torch.full_like(threshold, -inf))


def reject_sharded_adapters(named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """``NotImplementedError`` if one of the adapter parameters is a ``DTensor``: sharded by FSDP2
    (``torch.distributed.fsdp.fully_shard``) or tensor parallelism. The allocator scores and masks
    whole A, E, B matrices across all layers (every ``lora_E`` a view of one flat buffer it owns), which
    it cannot do on shards. Host cost: one dict lookup while ``torch.distributed.tensor`` was never
    imported (no DTensor can exist then), else one ``isinstance`` per parameter given."""
    if not dtensor_possible():
        return
    for name, p in named_params:
        if is_dtensor(p):
            raise NotImplementedError(
                f"{name} is sharded (a DTensor): adalora_fast does not support FSDP2 "
                "(torch.distributed.fsdp.fully_shard) or tensor parallelism on its adapters; the rank "
                "allocator scores and masks whole adapter matrices across all layers. Shard the frozen "
                "base only with adalora_fast.fully_shard(model) (FSDP2, the adapters replicated), or train "
                "with torch.nn.parallel.DistributedDataParallel: every rank then computes the same masks "
                "from the all-reduced gradients"
            )


def _stable_order(keys: Sequence[int]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Layer indices sorted (stably) by ``keys``, and groups (start, count, size) of equal keys."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    groups: list[tuple[int, int, int]] = []
    offset = 0
    for i in order:
        size = keys[i]
        if groups and groups[-1][2] == size:
            start, count, _ = groups[-1]
            groups[-1] = (start, count + 1, size)
        else:
            groups.append((offset, 1, size))
        offset += size
    return order, groups


class ReferenceScorer:
    """PEFT's rank allocator, per layer and readable; works for any per-layer ranks.

    State per layer: ``ema_ipt[name][kind]`` / ``ema_unc[name][kind]`` for each factor kind and
    ``keep[name]`` (bool, one per held rank).

    One deliberate departure from PEFT: when any adapter gradient of any layer holds inf or NaN (an
    fp16 step that GradScaler skips), :meth:`update_scores` leaves every EMA bitwise unchanged and
    adds 1 to ``nonfinite_steps`` (0-d int64 tensor), decided on the device. PEFT lets such
    gradients poison the EMAs.
    """

    name = "reference"

    def __init__(self, layers: Sequence[tuple[str, AdapterLayer]], beta1: float, beta2: float, target_r: int):
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.beta1, self.beta2 = beta1, beta2
        self.init_bgt = sum(m.lora_A.shape[0] for m in self.layers)
        self.target_bgt = target_r * len(self.layers)
        self.ema_ipt: dict[str, dict[str, torch.Tensor]] | None = None
        self.ema_unc: dict[str, dict[str, torch.Tensor]] | None = None
        self.keep = {
            n: torch.ones(m.lora_E.shape[0], dtype=torch.bool, device=m.lora_E.device) for n, m in layers
        }
        device = self.layers[0].lora_E.device if self.layers else torch.device("cpu")
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def has_scores(self) -> bool:
        return self.ema_ipt is not None

    def update_scores(self) -> None:
        """One EMA step for every element of every A, E, B; skipped for the whole model (EMAs bitwise
        unchanged, ``nonfinite_steps += 1``) when any gradient holds inf or NaN."""
        params = []
        for name, layer in zip(self.names, self.layers, strict=True):
            for kind in FACTORS:
                p = getattr(layer, kind)
                if p.grad is None:
                    raise missing_grad_error(name, kind)
                params.append((name, kind, p))
        if self.ema_ipt is None:
            self.ema_ipt = {n: {} for n in self.names}
            self.ema_unc = {n: {} for n in self.names}
        with torch.no_grad():
            # Weights too: a NaN weight with finite gradients would make I = |w g| NaN all the same.
            finite = grads_finite([p.grad for _, _, p in params] + [p for _, _, p in params])
            if self.nonfinite_steps.device != finite.device:
                self.nonfinite_steps = self.nonfinite_steps.to(finite.device)
            self.nonfinite_steps.add_(finite.logical_not())
            for name, kind, p in params:
                if kind not in self.ema_ipt[name]:
                    self.ema_ipt[name][kind] = torch.zeros_like(p)
                    self.ema_unc[name][kind] = torch.zeros_like(p)
                update_importance_(
                    p, p.grad, self.ema_ipt[name][kind], self.ema_unc[name][kind], self.beta1, self.beta2,
                    finite=finite,
                )  # fmt: skip

    def scores(self) -> dict[str, torch.Tensor]:
        """Triplet scores per layer (shape (r,))."""
        if self.ema_ipt is None:
            raise RuntimeError("no importance scores yet: update_and_allocate has not run a scoring step")
        out = {}
        for name in self.names:
            s = {k: self.ema_ipt[name][k] * self.ema_unc[name][k] for k in FACTORS}
            out[name] = triplet_scores(s["lora_A"], s["lora_E"], s["lora_B"])
        return out

    def mask_to_budget(self, budget: int) -> None:
        scores = self.scores()
        flat = torch.cat([scores[n] for n in self.names])
        threshold = untied_threshold(kth_smallest(flat, self.init_bgt - budget), flat, budget)
        with torch.no_grad():
            for name, layer in zip(self.names, self.layers, strict=True):
                masked = scores[name] <= threshold
                layer.lora_E.masked_fill_(masked.view(-1, 1), 0.0)
                self.keep[name] = ~masked

    def apply_keep(self) -> None:
        with torch.no_grad():
            for name, layer in zip(self.names, self.layers, strict=True):
                layer.lora_E.masked_fill_(~self.keep[name].to(layer.lora_E.device).view(-1, 1), 0.0)

    def free_scores(self) -> None:
        self.ema_ipt = self.ema_unc = None

    def keep_by_layer(self) -> dict[str, torch.Tensor]:
        return dict(self.keep)

    def set_keep(self, keep: Mapping[str, torch.Tensor]) -> None:
        self.keep = {
            n: keep[n].to(device=m.lora_E.device, dtype=torch.bool).reshape(-1).clone()
            for n, m in zip(self.names, self.layers, strict=True)
        }

    def layer_state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.ema_ipt is None:
            return out
        for n in self.names:
            for kind in FACTORS:
                out[f"{n}.{kind}.ema_ipt"] = self.ema_ipt[n][kind]
                out[f"{n}.{kind}.ema_unc"] = self.ema_unc[n][kind]
        return out

    def load_layer_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if not state:
            self.free_scores()
            return
        self.ema_ipt = {n: {} for n in self.names}
        self.ema_unc = {n: {} for n in self.names}
        for n, layer in zip(self.names, self.layers, strict=True):
            dev = layer.lora_A.device
            for kind in FACTORS:
                self.ema_ipt[n][kind] = state[f"{n}.{kind}.ema_ipt"].to(dev).clone()
                self.ema_unc[n][kind] = state[f"{n}.{kind}.ema_unc"].to(dev).clone()


class FlatScorer:
    """Vectorised scorer for layers that all have the same rank r (backend "torch").

    Gradients and weights of all A (B) are concatenated per kind in at most ``CHUNKS`` runs of layers
    (each run's element-wise chain stays in cache), the EMAs live in flat buffers owned by the scorer,
    per-layer means are taken over same-shape groups of layers, and the E parameters are views into
    one (M, r) buffer that the scorer owns (see :meth:`bind`), so that masking is a single op. The
    ATen op count of a step does not grow with the number of layers; nothing is read back to the host.
    """

    name = "torch"

    def __init__(self, layers: Sequence[tuple[str, AdapterLayer]], beta1: float, beta2: float, target_r: int):
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        # The modules' own parameter dicts: a dict lookup per parameter instead of
        # Module.__getattr__, which was the largest host cost of a call at 224 layers.
        self._pdicts = [m._parameters for m in self.layers]
        ranks = {m.lora_A.shape[0] for m in self.layers}
        if len(ranks) != 1:
            raise ValueError("FlatScorer needs one rank for all layers")
        self.r = ranks.pop()
        self.beta1, self.beta2 = beta1, beta2
        m = len(self.layers)
        self.init_bgt = self.r * m
        self.target_bgt = target_r * m
        # A matrices are concatenated along d_in, B along d_out, in orders sorted by that size so
        # that layers of one shape are adjacent and their per-row means are one reduction.
        self.a_order, self.a_groups = _stable_order([x.in_features for x in self.layers])
        self.b_order, self.b_groups = _stable_order([x.out_features for x in self.layers])
        self.a_offsets = self._offsets(self.a_order, [x.in_features for x in self.layers])
        self.b_offsets = self._offsets(self.b_order, [x.out_features for x in self.layers])
        self._a_inv: torch.Tensor | None = None
        self._b_inv: torch.Tensor | None = None
        self.flat_E: torch.Tensor | None = None
        self._E_ptrs: list[int] = []
        self._rebinds = -1  # the first bind is not a re-bind
        self._warned_rebinds = False
        self.ema_ipt: dict[str, torch.Tensor] | None = None
        self.ema_unc: dict[str, torch.Tensor] | None = None
        self.bind()
        self.keep = torch.ones(m, self.r, dtype=torch.bool, device=self.flat_E.device)
        # Scoring steps skipped because a gradient held inf/NaN (0-d int64, on the device).
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=self.flat_E.device)

    @staticmethod
    def _offsets(order: list[int], sizes: list[int]) -> list[int]:
        offsets = [0] * len(order)
        pos = 0
        for i in order:
            offsets[i] = pos
            pos += sizes[i]
        return offsets

    # ---- E storage ----------------------------------------------------------------------------
    def bind(self) -> None:
        """Make every ``lora_E`` a view of one (M, r) buffer; re-done only when a pointer changed
        (``model.to()``, ``load_state_dict(assign=True)``, ``.data`` replaced)."""
        params = self._kind_params("lora_E")
        if not all(map((self.r, 1).__eq__, map(_shape, params))):  # C-level loop: runs every call
            changed = [n for n, p in zip(self.names, params, strict=True) if p.shape != (self.r, 1)]
            raise RuntimeError(
                f"{changed[0]}.lora_E has shape {tuple(params[self.names.index(changed[0])].shape)}, this "
                f"scorer was built for rank {self.r}: the layers were resized (compact()?); rebuild the "
                "allocator (model.build_allocator())"
            )
        # Same address as our row of flat_E means same storage, hence same device and dtype.
        if self.flat_E is not None and list(map(_data_ptr, params)) == self._E_ptrs:
            return
        # (Re-)binding: never onto FSDP2 shards (a DTensor's data_ptr is 0: they always get here).
        reject_sharded_adapters(zip([f"{n}.lora_E" for n in self.names], params, strict=True))
        self._rebinds += 1
        if self._rebinds > 3 and not self._warned_rebinds:
            self._warned_rebinds = True
            warnings.warn(
                "lora_E storage keeps being replaced between allocator calls (FSDP or DeepSpeed owning "
                "parameter storage?): adalora_fast's vectorised allocator re-binds it on every call; "
                "sharded-parameter frameworks are not supported yet",
                stacklevel=3,
            )
        with torch.no_grad():
            flat = torch.stack([p.detach().reshape(-1) for p in params])
            for i, p in enumerate(params):
                p.data = flat[i].view(self.r, 1)
        self.flat_E = flat
        self._E_ptrs = [p.data_ptr() for p in params]
        device = flat.device
        self._a_inv = torch.tensor(self._inverse(self.a_order), device=device)
        self._b_inv = torch.tensor(self._inverse(self.b_order), device=device)
        if hasattr(self, "keep"):
            self.keep = self.keep.to(device)
            self.nonfinite_steps = self.nonfinite_steps.to(device)
        self._move_scores(device)

    def _move_scores(self, device: torch.device) -> None:
        """Move the EMA state to ``device`` (after the adapters moved)."""
        if self.ema_ipt is not None:
            self.ema_ipt = {k: v.to(device) for k, v in self.ema_ipt.items()}
            self.ema_unc = {k: v.to(device) for k, v in self.ema_unc.items()}

    def _kind_params(self, kind: str) -> list[torch.Tensor]:
        """Every layer's ``kind`` parameter (``lora_A``, ``lora_E`` or ``lora_B``), in layer order."""
        return [d[kind] for d in self._pdicts]

    @staticmethod
    def _inverse(order: list[int]) -> list[int]:
        inv = [0] * len(order)
        for pos, i in enumerate(order):
            inv[i] = pos
        return inv

    # ---- scores -------------------------------------------------------------------------------
    def _grad(self, name: str, kind: str, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            raise missing_grad_error(name, kind)
        return p.grad

    def _runs(self, kind: str) -> list[tuple[list[int], int, int]]:
        """The layers of ``kind``'s concatenation order in at most CHUNKS consecutive runs:
        ``(layer indices, start, end)`` with start/end the run's span in the flat buffer (columns of
        A's (r, sum d_in), rows of B's (sum d_out, r))."""
        order, size = (self.a_order, "in_features") if kind == "lora_A" else (self.b_order, "out_features")
        n = min(CHUNKS, len(order))
        bounds = [round(j * len(order) / n) for j in range(n + 1)]
        runs, pos = [], 0
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            idx = order[lo:hi]
            span = sum(getattr(self.layers[i], size) for i in idx)
            runs.append((idx, pos, pos + span))
            pos += span
        return runs

    def _cat(self, kind: str, idx: Sequence[int], grads: bool) -> torch.Tensor:
        """``kind``'s weights (or gradients) of layers ``idx``, concatenated in the flat layout."""
        dim = 0 if kind == "lora_B" else 1
        params = [self._pdicts[i][kind] for i in idx]
        if grads:
            params = [self._grad(self.names[i], kind, p) for i, p in zip(idx, params, strict=True)]
        return torch.cat(params, dim=dim)

    def _grads_finite(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """0-d bool device tensor: no element of ``grads`` is inf or NaN. No host sync. Here ``grads``
        are the concatenated gradient runs (a fixed number), so the op count does not grow with depth."""
        return grads_finite(grads)

    def _count_nonfinite(self, finite: torch.Tensor) -> None:
        """``nonfinite_steps += not finite`` on the device."""
        self.nonfinite_steps.add_(finite.logical_not())

    def update_scores(self) -> None:
        """One EMA step for every element of every A, E, B of the model.

        If any adapter gradient holds inf or NaN (an fp16 step that GradScaler skips), the step is
        skipped for the whole model: the EMAs stay bitwise unchanged (``torch.where``, so no NaN gets
        in) and ``nonfinite_steps`` counts it. Decided on the device, no host sync.
        """
        self.bind()
        with torch.no_grad():
            # Gradients first (all of them decide whether the step counts), in at most CHUNKS runs of
            # layers per kind: each run's concatenation and element-wise chain stay in cache, and the
            # op count does not grow with depth.
            runs = [(kind, idx, lo, hi, self._cat(kind, idx, grads=True))
                    for kind in ("lora_A", "lora_B") for idx, lo, hi in self._runs(kind)]  # fmt: skip
            all_layers = range(len(self.layers))
            g_E = self._cat("lora_E", all_layers, grads=True)
            if self.ema_ipt is None:
                shapes = {"lora_A": (self.r, self._span("lora_A")), "lora_B": (self._span("lora_B"), self.r),
                          "lora_E": tuple(g_E.shape)}  # fmt: skip
                self.ema_ipt = {k: g_E.new_zeros(shape) for k, shape in shapes.items()}
                self.ema_unc = {k: g_E.new_zeros(shape) for k, shape in shapes.items()}
            weights = [self._cat(kind, idx, grads=False) for kind, idx, _, _, _ in runs]
            # Weights too: a NaN weight with finite gradients would make I = |w g| NaN all the same.
            finite = self._grads_finite([run[4] for run in runs] + [g_E, *weights, self.flat_E])
            self._count_nonfinite(finite)
            coeffs = self._coefficients(finite, g_E)
            for (kind, _, lo, hi, g), p in zip(runs, weights, strict=True):
                ema, unc = self.ema_ipt[kind], self.ema_unc[kind]
                if kind == "lora_A":
                    self._ema_step(p, g, ema[:, lo:hi], unc[:, lo:hi], coeffs)
                else:
                    self._ema_step(p, g, ema[lo:hi], unc[lo:hi], coeffs)
            self._ema_step(self.flat_E.T, g_E, self.ema_ipt["lora_E"], self.ema_unc["lora_E"], coeffs)

    def _span(self, kind: str) -> int:
        return sum(x.in_features if kind == "lora_A" else x.out_features for x in self.layers)

    def _ema_step(
        self, p: torch.Tensor, g: torch.Tensor, ema: torch.Tensor, unc: torch.Tensor, coeffs: _Coeffs
    ) -> None:
        """Both EMAs of ``p`` in place with PEFT's products and sums, in order (``b*ema + (1-b)*I``).

        On a non-finite step the coefficients are (1, 0) and I is zeroed, so both EMAs come out
        bitwise unchanged (``ema*1 + 0*0``) without a second buffer or a select pass."""
        skip, b1, c1, b2, c2 = coeffs
        ipt = (p * g).abs_().masked_fill_(skip, 0.0)
        ema.mul_(b1).add_(ipt * c1)
        unc.mul_(b2).add_((ipt - ema).abs_().mul_(c2))

    def _coefficients(self, finite: torch.Tensor, like: torch.Tensor) -> _Coeffs:
        """(skip, b1, 1-b1, b2, 1-b2) as 0-d device tensors: the betas on a finite step, (1, 0) on a
        skipped one. fp32 0-d tensors multiply exactly as the Python floats PEFT uses do."""

        def pick(value: float, fallback: float) -> torch.Tensor:
            v = torch.tensor(value, dtype=like.dtype).to(like.device)
            return torch.where(finite, v, torch.tensor(fallback, dtype=like.dtype).to(like.device))

        b1, b2 = self.beta1, self.beta2
        return finite.logical_not(), pick(b1, 1.0), pick(1 - b1, 0.0), pick(b2, 1.0), pick(1 - b2, 0.0)

    def scores(self) -> torch.Tensor:
        """Triplet scores, shape (M, r)."""
        if self.ema_ipt is None:
            raise RuntimeError("no importance scores yet: update_and_allocate has not run a scoring step")
        s = {k: self.ema_ipt[k] * self.ema_unc[k] for k in FACTORS}
        r = self.r
        mean_A = torch.cat(
            [s["lora_A"][:, o : o + n * d].view(r, n, d).mean(dim=2) for o, n, d in self.a_groups], dim=1
        ).index_select(1, self._a_inv)
        mean_B = torch.cat(
            [s["lora_B"][o : o + n * d].view(n, d, r).mean(dim=1) for o, n, d in self.b_groups], dim=0
        ).index_select(0, self._b_inv)
        return s["lora_E"].T + (mean_A.T + mean_B)

    def mask_to_budget(self, budget: int) -> None:
        with torch.no_grad():
            scores = self.scores()
            flat = scores.reshape(-1)
            threshold = untied_threshold(kth_smallest(flat, self.init_bgt - budget), flat, budget)
            # PEFT masks `score <= threshold` and keeps the rest (NaN scores are kept, as in PEFT).
            torch.logical_not(torch.le(scores, threshold), out=self.keep)
            self.apply_keep()

    def apply_keep(self) -> None:
        self.bind()
        with torch.no_grad():
            self.flat_E.masked_fill_(self.keep.logical_not(), 0.0)

    @property
    def has_scores(self) -> bool:
        return self.ema_ipt is not None

    def free_scores(self) -> None:
        self.ema_ipt = self.ema_unc = None

    # ---- per-layer state (checkpoints, comparisons) -------------------------------------------
    def layer_state(self) -> dict[str, torch.Tensor]:
        """``{"<module>.<kind>.ema_ipt" | ".ema_unc": tensor}`` in each parameter's shape."""
        out: dict[str, torch.Tensor] = {}
        if self.ema_ipt is None:
            return out
        for i, name in enumerate(self.names):
            x = self.layers[i]
            for tag, bufs in (("ema_ipt", self.ema_ipt), ("ema_unc", self.ema_unc)):
                a, b = self.a_offsets[i], self.b_offsets[i]
                out[f"{name}.lora_A.{tag}"] = bufs["lora_A"][:, a : a + x.in_features]
                out[f"{name}.lora_B.{tag}"] = bufs["lora_B"][b : b + x.out_features]
                out[f"{name}.lora_E.{tag}"] = bufs["lora_E"][:, i : i + 1]
        return out

    def load_layer_state(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.ema_ipt = self.ema_unc = None
            return
        self.bind()
        device = self.flat_E.device
        a_names = [self.names[i] for i in self.a_order]
        b_names = [self.names[i] for i in self.b_order]
        self.ema_ipt, self.ema_unc = {}, {}
        for tag, bufs in (("ema_ipt", self.ema_ipt), ("ema_unc", self.ema_unc)):
            bufs["lora_A"] = torch.cat([state[f"{n}.lora_A.{tag}"] for n in a_names], dim=1).to(device)
            bufs["lora_B"] = torch.cat([state[f"{n}.lora_B.{tag}"] for n in b_names], dim=0).to(device)
            bufs["lora_E"] = torch.cat([state[f"{n}.lora_E.{tag}"] for n in self.names], dim=1).to(device)

    def keep_by_layer(self) -> dict[str, torch.Tensor]:
        return {n: self.keep[i] for i, n in enumerate(self.names)}

    def set_keep(self, keep: dict[str, torch.Tensor]) -> None:
        self.keep = torch.stack([keep[n].to(torch.bool).reshape(-1) for n in self.names]).to(self.keep.device)
