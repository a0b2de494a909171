"""The rank allocator: PEFT's AdaLoRA schedule (warm-up, cubic budget decay, final fixed pattern) on
top of a scorer, with its whole state in :meth:`RankAllocator.state_dict`.

Call :meth:`RankAllocator.update_and_allocate` after ``optimizer.step()`` and before ``zero_grad()``
with the 0-based optimizer step. The tensor work is the scorer's (:mod:`.scorers`); the budget is the
spec's :func:`~adalora_fast.reference.budget_schedule`. Only this class writes its fields: checkpoints
and conversions go through :meth:`~RankAllocator.state_dict` / :meth:`~RankAllocator.load_state_dict`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..backend import choose, fall_back
from ..factors import FACTORS, AdapterLayer, expand_pattern
from ..reference import budget_schedule
from .compaction import compact_layers_
from .scorers import FlatScorer, ReferenceScorer, Scorer, reject_sharded_adapters

if TYPE_CHECKING:
    from ..config import AdaLoraConfig

__all__ = ["STATE_FLAGS", "RankAllocator", "check_state", "make_scorer"]

# The allocator's scalar state, in state_dict() and in the training-state file's metadata.
STATE_FLAGS = ("last_step", "budget", "masked", "finalized", "compacted")


def check_state(
    state: Mapping[str, Any], shapes: Mapping[str, Mapping[str, tuple[int, ...]]], source: str
) -> None:
    """``ValueError`` naming ``source`` unless ``state`` (a :meth:`RankAllocator.state_dict`) fits
    layers whose factors have ``shapes`` (``{module: {"lora_A": shape, ...}}``): a keep mask of one
    bool per held rank for every module, and, when it holds scores, both EMAs of every factor in the
    factor's shape. Checks only: nothing is loaded."""
    missing = [k for k in STATE_FLAGS if k not in state]
    if missing:
        raise ValueError(f"{source}: allocator state has no {missing[0]!r}")
    keep, scores = state.get("keep", {}), state.get("scores", {})
    for name, factor_shapes in shapes.items():
        r = factor_shapes["lora_A"][0]
        mask = keep.get(name)
        if mask is None or tuple(mask.shape) != (r,):
            got = None if mask is None else tuple(mask.shape)
            raise ValueError(f"{source}: keep mask of module {name!r} has shape {got}, expected ({r},)")
        if not scores:
            continue
        for kind in FACTORS:
            for tag in ("ema_ipt", "ema_unc"):
                ema = scores.get(f"{name}.{kind}.{tag}")
                if ema is None or tuple(ema.shape) != tuple(factor_shapes[kind]):
                    got = None if ema is None else tuple(ema.shape)
                    raise ValueError(
                        f"{source}: score EMA {tag} of {name}.{kind} has shape {got}, "
                        f"expected {tuple(factor_shapes[kind])}"
                    )


def as_step(step: object, where: str) -> int:
    """``step`` as a Python int: ints, numpy integers and 0-d integer tensors (read once, a host sync
    for a device tensor); bools, floats and negative steps are refused naming ``where``."""
    if isinstance(step, torch.Tensor):
        if (
            step.dim() != 0
            or step.dtype.is_floating_point
            or step.dtype.is_complex
            or step.dtype == torch.bool
        ):
            raise TypeError(
                f"{where}: step must be an integer, got a {tuple(step.shape)} {step.dtype} tensor"
            )
        step = int(step.item())
    elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{where}: step must be an integer (the 0-based optimizer step), got {step!r}")
    step = int(step)
    if step < 0:
        raise ValueError(f"{where}: step must be >= 0 (the 0-based optimizer step), got {step}")
    return step


def make_scorer(
    layers: Sequence[tuple[str, AdapterLayer]], beta1: float, beta2: float, target_r: int, backend: str
) -> Scorer:
    """The scorer for ``backend`` ("reference" forces the per-layer spec; layers of different ranks
    always get it). "triton" falls back to the torch scorer, warned once, where the score kernels
    cannot take the adapters (``importance_ema.unsupported_reason``)."""
    args = (layers, beta1, beta2, target_r)
    uniform = len({m.lora_A.shape[0] for _, m in layers}) == 1
    if backend == "reference" or not uniform:
        return ReferenceScorer(*args)

    def unsupported() -> str | None:
        from ..kernels import importance_ema

        return importance_ema.unsupported_reason([getattr(m, k) for _, m in layers for k in FACTORS])

    choice = choose("allocator", backend, layers[0][1].lora_A.device, unsupported)
    if choice.backend == "triton":
        from .triton_scorer import TritonScorer

        return TritonScorer(*args)
    if choice.reason is not None:
        fall_back("allocator", choice.reason)
    return FlatScorer(*args)


class RankAllocator:
    """PEFT's AdaLoRA schedule on top of a scorer, for the adapted ``layers`` (``(name, layer)`` pairs).

    With ``config.compact_after_final`` the layers are compacted (:meth:`compact`) as soon as the final
    pattern is recorded; the scorer is then replaced by a bookkeeping-only reference scorer whose keep
    masks are all True (the pattern is applied by construction), and later steps do nothing."""

    def __init__(
        self, layers: Sequence[tuple[str, AdapterLayer]], config: AdaLoraConfig, backend: str = "auto"
    ):
        reject_sharded_adapters((f"{n}.{k}", getattr(m, k)) for n, m in layers for k in FACTORS)
        self.config = config
        self.layers = list(layers)
        self.names = [n for n, _ in layers]
        self.scorer: Scorer = make_scorer(layers, config.beta1, config.beta2, config.target_r, backend)
        self._init_bgt, self._target_bgt = self.scorer.init_bgt, self.scorer.target_bgt
        self.last_step: int | None = None
        self.budget: int = self.scorer.init_bgt
        self.masked = False  # a mask step has happened: the keep pattern is meaningful
        self.finalized = False  # the final pattern is recorded (step >= T - tfinal)
        self.compacted = False  # the layers hold only their kept ranks (compact())

    @property
    def nonfinite_steps(self) -> torch.Tensor:
        """How many scoring steps were skipped because an adapter gradient held inf or NaN: a 0-d int64
        tensor on the adapters' device, updated without host syncs (``int()`` of it syncs)."""
        return self.scorer.nonfinite_steps

    @property
    def init_bgt(self) -> int:
        return self._init_bgt

    @property
    def target_bgt(self) -> int:
        return self._target_bgt

    def schedule(self, step: int) -> tuple[int, bool]:
        cfg = self.config
        return budget_schedule(
            step,
            init_bgt=self.init_bgt,
            target_bgt=self.target_bgt,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            total_step=cfg.total_step,
            deltaT=cfg.deltaT,
        )

    def update_and_allocate(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Update scores and masks for ``step``; returns the budget of that step (a Python int).

        Steps with inf/NaN in any adapter gradient (fp16 steps that GradScaler skips) leave the
        scores untouched (see ``nonfinite_steps``); a mask step among them masks with the previous
        scores. No host sync on any step, except the one step that compacts.

        ``optimizer`` is needed (and only used) when ``config.compact_after_final`` is set and this
        call compacts the layers (the first call with ``step >= total_step - tfinal``): its state is
        sliced with the parameters. Passing it on every call is fine.
        """
        step = as_step(step, "update_and_allocate")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"update_and_allocate({step}): the last call scored step {self.last_step}; steps must "
                "increase (each optimizer step is scored once, with the 0-based optimizer step). To score "
                "from an earlier step on purpose, call model.rank_allocator.reset_step() first"
            )
        if self.layers:  # one parameter suffices: fully_shard shards all of a module group's
            name, first = self.layers[0]
            reject_sharded_adapters(((f"{name}.lora_E", first._parameters["lora_E"]),))
        cfg = self.config
        cfg.validate()  # fields changed since construction (a few microseconds)
        if cfg.total_step is None:
            raise ValueError(
                "total_step is None: set AdaLoraConfig.total_step (or call model.set_total_step(n)) "
                "before update_and_allocate"
            )
        final_step = cfg.total_step - cfg.tfinal
        if self.compacted:
            if step < final_step:
                raise RuntimeError(
                    f"update_and_allocate({step}): the layers were compacted to the final rank pattern, "
                    f"which only steps >= total_step - tfinal = {final_step} may follow"
                )
            # The pattern is applied by construction: nothing to score, nothing to re-mask.
            self.finalized = True
            self.last_step = step
            self.budget = self.target_bgt
            return self.budget
        if step < final_step:
            self.scorer.update_scores()
            budget, mask = self.schedule(step)
            if mask:
                self.scorer.mask_to_budget(budget)
                self.masked = True
        elif step == final_step:
            self._require_optimizer(step, final_step, optimizer)
            # One forced mask at the target budget with the last scores; the pattern is then fixed.
            self.scorer.mask_to_budget(self.target_bgt)
            self.scorer.free_scores()
            self.masked = self.finalized = True
            budget = self.target_bgt
        else:
            if not self.masked:
                raise RuntimeError(
                    f"step {step} is past total_step - tfinal = {final_step} but no rank pattern was recorded"
                )
            self._require_optimizer(step, final_step, optimizer)
            # As PEFT: past the final step, the last recorded pattern is re-applied every step.
            self.scorer.free_scores()
            self.finalized = True
            self.scorer.apply_keep()
            budget = self.target_bgt
        if cfg.compact_after_final and self.finalized:
            self.compact(optimizer)
        self.last_step = step
        self.budget = budget
        return budget

    def reset_step(self, last_step: int | None = None) -> None:
        """Accept any step after ``last_step`` (None: any step) at the next :meth:`update_and_allocate`,
        keeping scores and masks: for restarting a schedule, or going back on purpose."""
        self.last_step = None if last_step is None else as_step(last_step, "reset_step")

    def _require_optimizer(self, step: int, final_step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if self.config.compact_after_final and optimizer is None:
            raise ValueError(
                f"compact_after_final=True: update_and_allocate({step}) compacts the layers to the final "
                f"rank pattern (step >= total_step - tfinal = {final_step}) and needs the optimizer to "
                "slice its state: call update_and_allocate(step, optimizer=opt)"
            )

    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Shrink every layer to its kept ranks, in place, slicing ``optimizer``'s per-parameter state
        (:func:`~adalora_fast.allocator.compact_layers_`). Returns whether anything was compacted:
        False before the first mask step (nothing is masked) and when already compacted. Raises
        ``RuntimeError`` while the pattern can still change (a mask step happened but the final
        pattern is not recorded yet): masked ranks may revive in the budget phase. One host sync (the
        pattern decides the shapes).
        """
        if self.compacted or not self.masked:
            return False
        if not self.finalized:
            cfg = self.config
            final = None if cfg.total_step is None else cfg.total_step - cfg.tfinal
            raise RuntimeError(
                f"compact() before the final rank pattern is recorded (last step {self.last_step}, final "
                f"step total_step - tfinal = {final}): masked ranks may still revive in the budget phase. "
                "Compact after update_and_allocate(total_step - tfinal), or save_pretrained and load with "
                "is_trainable=False for a pruned inference model"
            )
        keep = {n: k.cpu().tolist() for n, k in self.scorer.keep_by_layer().items()}
        compact_layers_(self.layers, keep, optimizer)
        self._mark_compacted()
        return True

    def _mark_compacted(self) -> None:
        """Record that the layers hold only their kept ranks: the scorer becomes a bookkeeping-only
        reference scorer (layers may now differ in rank) with every rank kept."""
        counter = self.scorer.nonfinite_steps
        cfg = self.config
        self.scorer = ReferenceScorer(self.layers, cfg.beta1, cfg.beta2, cfg.target_r)
        self.scorer.nonfinite_steps = counter
        self.masked = self.finalized = self.compacted = True

    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """The keep pattern of the last mask step over init_r ranks (host lists), or None before any
        mask step."""
        if not self.masked:
            return None
        keep = self.scorer.keep_by_layer()
        return {n: expand_pattern(m.held_pattern, keep[n].cpu().tolist(), m.init_r) for n, m in self.layers}

    def keep_mask(self) -> dict[str, torch.Tensor]:
        """``{module: bool tensor}``: the keep mask over each layer's held ranks (all True before the
        first mask step)."""
        return self.scorer.keep_by_layer()

    def total_kept_rank(self) -> int:
        """The total kept rank of all layers (one host sync: for logging)."""
        keep = list(self.keep_mask().values())
        return int(torch.stack([k.sum() for k in keep]).sum()) if keep else 0

    # ---- state ----------------------------------------------------------------------------------
    def factor_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """``{module: {factor: shape}}`` of the layers as they are now."""
        return {n: {k: tuple(getattr(m, k).shape) for k in FACTORS} for n, m in self.layers}

    def state_dict(self) -> dict[str, Any]:
        """Everything the allocator knows, as plain data (tensors are the live ones, not copies):
        ``last_step``, ``budget``, ``masked``, ``finalized``, ``compacted`` (Python values),
        ``nonfinite_steps`` (0-d int64 tensor), ``keep`` (``{module: bool tensor}`` over the held
        ranks) and ``scores`` (``{"<module>.<factor>.ema_ipt" | ".ema_unc": tensor}``, empty when
        there are none: before the first step and once the final pattern is fixed)."""
        return {
            "last_step": self.last_step,
            "budget": self.budget,
            "masked": self.masked,
            "finalized": self.finalized,
            "compacted": self.compacted,
            "nonfinite_steps": self.scorer.nonfinite_steps,
            "keep": self.keep_mask(),
            "scores": self.scorer.layer_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "allocator state") -> None:
        """Restore a :meth:`state_dict` (``nonfinite_steps`` may be absent: it then stays). Checked
        against the layers first (:func:`check_state`); nothing changes when it does not fit. A state
        saved compacted needs layers that hold the compacted ranks (as a checkpoint loads them)."""
        check_state(state, self.factor_shapes(), source)
        if self.compacted and not state["compacted"]:
            raise ValueError(f"{source}: saved with compacted=False, the layers are compacted")
        if state["compacted"] and not self.compacted:
            self._mark_compacted()
        self.scorer.load_layer_state(state.get("scores", {}))
        self.scorer.set_keep(state["keep"])
        self.last_step = state["last_step"]
        self.budget = state["budget"]
        self.masked = bool(state["masked"])
        self.finalized = bool(state["finalized"])
        if state.get("nonfinite_steps") is not None:
            counter = self.scorer.nonfinite_steps
            self.scorer.nonfinite_steps = (
                state["nonfinite_steps"].reshape(()).to(device=counter.device, dtype=torch.int64)
            )
