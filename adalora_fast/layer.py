"""The adapted layer: a frozen base linear plus the AdaLoRA update ``B diag(E) A``.

Parameter names and shapes are PEFT's (``lora_A`` r x d_in, ``lora_E`` r x 1, ``lora_B`` d_out x r,
frozen ``ranknum``), without PEFT's per-adapter ``.default`` level: one adapter per layer. The layer
holds the parameters and calls :func:`adalora_fast.functional.svd_linear`, which picks the path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from . import functional
from .factors import RANK_DIMS, expand_pattern, scale_numerator
from .quantized import dequantize, int8_scales, quantization, requantize_
from .reference import delta_weight
from .targets import base_features

# How many times an SVDLinear replaced its A, E, B with new parameter objects in this process: hooks held
# on the old objects (adalora_fast.fully_shard's gradient sync) look again only when it changed.
_adapter_generation = 0


def adapter_generation() -> int:
    """A counter bumped each time an :class:`SVDLinear` replaces its factor parameters (``resize``,
    ``adopt_factors``); in-place changes (compaction, loading into the same tensors) leave it."""
    return _adapter_generation


def _factors_replaced() -> None:
    global _adapter_generation
    _adapter_generation += 1


class SVDLinear(nn.Module):
    """``y = base(x) + dropout(x) A^T diag(E) B^T * lora_alpha / (ranknum + 1e-5)``."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_r: int | None = None,
        backend: str = "auto",
        adapter_dtype: torch.dtype | None = None,
        init_lora_weights: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = base_features(base_layer)
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.r = r
        self.init_r = init_r if init_r is not None else r
        self.lora_alpha = lora_alpha
        self.scaling = scale_numerator(lora_alpha, self.init_r)
        self.backend = backend
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        weight = base_layer.weight
        # Created on the CPU in PEFT's order (A, E, B, ranknum, then re-init), so that one seed gives
        # PEFT's initial values; then moved to the base device. init_lora_weights=False keeps PEFT's raw
        # N(0, 1) draws (E non-zero: the adapter changes the outputs from the start).
        A = torch.randn(r, self.in_features)
        E = torch.randn(r, 1)
        B = torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT draws ranknum's placeholder from the same stream
        if init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(E)
                nn.init.normal_(A, mean=0.0, std=0.02)
                nn.init.normal_(B, mean=0.0, std=0.02)
        # fp32 adapters by default (also on half-precision bases); a float64 base gets float64 (as PEFT).
        default_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dtype = adapter_dtype if adapter_dtype is not None else default_dtype
        if weight.dtype in (torch.float16, torch.bfloat16):
            # PEFT casts adapters to the base dtype, then back up: initial values are base-dtype-rounded.
            A, B = A.to(weight.dtype), B.to(weight.dtype)

        def param(t: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
            return nn.Parameter(t.to(device=weight.device, dtype=dtype), requires_grad=requires_grad)

        self.lora_A = param(A)
        self.lora_E = param(E)
        self.lora_B = param(B)
        # ranknum == init_r for ever, also after pruning and reload (PEFT's scale contract).
        self.ranknum = param(torch.full((1,), float(self.init_r)), requires_grad=False)
        # Which init_r positions the factors hold (None: all; see adalora_fast.factors).
        self.held_pattern: list[bool] | None = None
        self.merged = False
        # PEFT's layer flag (set through AdaLoraModel.disable_adapter*): run the base layer alone.
        self.disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:  # transformers code sometimes reads `.weight` of linears
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def resize(self, r: int, held_pattern: list[bool] | None = None) -> None:
        """Re-create A, E, B (zeros) at rank ``r`` holding the init_r positions ``held_pattern`` (used when
        loading pruned checkpoints); ranknum unchanged."""
        self._set_rank(r, held_pattern)
        dev, dtype = self.lora_A.device, self.lora_A.dtype
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=dev, dtype=dtype))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype))
        _factors_replaced()

    def adopt_factors(
        self,
        lora_A: nn.Parameter,
        lora_E: nn.Parameter,
        lora_B: nn.Parameter,
        held_pattern: list[bool] | None = None,
    ) -> None:
        """Take these ``nn.Parameter`` objects as the layer's factors, as they are (no copy: an optimizer
        that holds them goes on training them), holding the init_r positions ``held_pattern``."""
        self._set_rank(lora_A.shape[0], held_pattern)
        self.lora_A, self.lora_E, self.lora_B = lora_A, lora_E, lora_B
        _factors_replaced()

    def _set_rank(self, r: int, held_pattern: list[bool] | None) -> None:
        if held_pattern is not None and (len(held_pattern) != self.init_r or sum(held_pattern) != r):
            raise ValueError(f"held pattern {held_pattern} does not give rank {r} of init_r={self.init_r}")
        self.r = r
        self.held_pattern = None if held_pattern is None else [bool(k) for k in held_pattern]

    @torch.no_grad()
    def select_ranks_(self, keep: Sequence[bool]) -> None:
        """Keep only the held ranks that ``keep`` (one host bool per held rank) marks, in place: the same
        ``nn.Parameter`` objects get sliced ``.data`` (and ``.grad`` when present), so optimizers and
        hooks that hold them keep working. ``ranknum`` stays ``init_r`` (the scale does not change);
        the held pattern records which init_r positions remain. Slicing an optimizer's state is the
        caller's job (:func:`adalora_fast.allocator.compact_layers_`).
        """
        if len(keep) != self.r:
            raise ValueError(f"select_ranks_: {len(keep)} keep flags for a layer holding {self.r} ranks")
        positions = [i for i, k in enumerate(keep) if k]
        index = torch.tensor(positions, dtype=torch.long, device=self.lora_A.device)
        for kind, dim in RANK_DIMS:
            p = getattr(self, kind)
            grad = p.grad
            p.grad = None
            new = p.data.index_select(dim, index.to(p.device))
            # The parameter's cached gradient accumulator (alive while an old graph references it)
            # remembers the old shape; PyTorch drops it only when .data changes dtype or device, so
            # pass through another dtype first (nothing is copied).
            p.data = new.new_empty(0, dtype=torch.float64 if new.dtype != torch.float64 else torch.float32)
            p.data = new
            if grad is not None:
                p.grad = grad.index_select(dim, index.to(grad.device))
        self.held_pattern = expand_pattern(self.held_pattern, keep, self.init_r)
        self.r = len(positions)

    def get_delta_weight(self) -> torch.Tensor:
        """dW in the base weight's layout (transposed for Conv1D), in the adapter dtype."""
        dw = delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scaling, self.ranknum)
        return dw.T if self.fan_in_fan_out else dw

    @torch.no_grad()
    def merge(self, exact_unmerge: bool = True) -> None:
        """Fold the update into the base weight: ``W <- cast(W + dW)``, summed in fp32 (fp64 for fp64
        weights or adapters) and cast once to W's dtype; the forward then runs the base layer alone.

        ``exact_unmerge=True`` keeps a copy of the original W (one weight's memory per layer, W's
        dtype, in a non-persistent buffer: not saved, moved with the module) so that :meth:`unmerge`
        restores it bit for bit. With ``False`` nothing is kept and :meth:`unmerge` subtracts dW
        again, which leaves W within one rounding of its dtype of the original. A merged layer gets no
        adapter gradients: unmerge before training again.
        """
        if self.merged:
            warnings.warn("SVDLinear.merge: already merged; nothing done", stacklevel=2)
            return
        refusal = self.merge_refusal()
        if refusal is not None:
            raise TypeError(f"SVDLinear.merge: {refusal}")
        if quantization(self.base_layer) is not None:
            self._merge_quantized(+1.0, keep=exact_unmerge)
            self.merged = True
            return
        weight = self.base_layer.weight
        if exact_unmerge:
            self.register_buffer("unmerged_weight", weight.detach().clone(), persistent=False)
        weight.copy_(self._merge_sum(weight, +1.0))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the saved original weight back (bitwise), or ``W - dW`` without one."""
        if not self.merged:
            warnings.warn("SVDLinear.unmerge: not merged; nothing done", stacklevel=2)
            return
        if quantization(self.base_layer) is not None:
            self._merge_quantized(-1.0, keep=False)
            self.merged = False
            return
        weight = self.base_layer.weight
        saved = self._buffers.pop("unmerged_weight", None)
        weight.copy_(saved if saved is not None else self._merge_sum(weight, -1.0))
        self.merged = False

    def merge_refusal(self) -> str | None:
        """Why :meth:`merge` cannot fold the update into this base weight, or None: a tensor-subclass
        weight other than bitsandbytes' (torchao's ``NF4Tensor``, say) has no add-and-requantise here."""
        weight = self.base_layer.weight
        if quantization(self.base_layer) is None and type(weight) not in (torch.Tensor, nn.Parameter):
            return (
                f"the base weight is a {type(weight).__name__} (a tensor subclass: torchao's NF4Tensor, "
                "say), which merging does not support; keep the adapter unmerged, or load the base in "
                "full precision or with bitsandbytes to merge"
            )
        return None

    def merged_weight(self) -> torch.Tensor:
        """``W + dW`` as :meth:`merge` would compute it before any re-quantisation or cast: fp32 for a
        quantised base (dequantised first), else summed as :meth:`merge` sums and cast to W's dtype."""
        if quantization(self.base_layer) is not None:
            dw = self.get_delta_weight().float()
            return dequantize(self.base_layer) + dw.to(self.base_layer.weight.device)
        return self._merge_sum(self.base_layer.weight, +1.0)

    def _merge_quantized(self, sign: float, keep: bool) -> None:
        """Merge (+1) or unmerge (-1) on a bitsandbytes base, as PEFT's LoRA does there: dequantise,
        add ``sign * dW`` in fp32, quantise again (see :mod:`adalora_fast.quantized` for the rounding).
        Merging with ``keep`` holds on to the original quantised weight (its packed size), which
        unmerging puts back bit for bit."""
        base = self.base_layer
        saved = self.__dict__.pop("_unmerged_quantized", None)  # a plain attribute: not a parameter
        if sign < 0 and saved is not None:
            base.weight, scales = saved
            if scales is not None:  # int8: bitsandbytes keeps the row scales in the layer's state
                base.state.reset_grads()
                base.state.SCB, base.state.CB = scales, base.weight.data
            return
        original, scales = base.weight, int8_scales(base)
        w = dequantize(base) + sign * self.get_delta_weight().to(device=original.device, dtype=torch.float32)
        requantize_(base, w)
        if keep and sign > 0:
            self.__dict__["_unmerged_quantized"] = (original, scales)

    def _merge_sum(self, weight: torch.Tensor, sign: float) -> torch.Tensor:
        delta = self.get_delta_weight()
        acc = torch.promote_types(torch.promote_types(torch.float32, weight.dtype), delta.dtype)
        return (weight.to(acc) + sign * delta.to(device=weight.device, dtype=acc)).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()  # as PEFT's layers: a disabled layer gives the base layer's output
        if self.merged or self.disable_adapters:
            return self.base_layer(x)
        base, drop = self.base_layer, self.lora_dropout
        return functional.svd_linear(
            x, base.weight, base.bias, self.lora_A, self.lora_E, self.lora_B, self.ranknum, self.scaling,
            dropout_p=drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0,
            fan_in_fan_out=self.fan_in_fan_out, backend=self.backend, base_forward=base,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, init_r={self.init_r}, scaling={self.scaling}, fan_in_fan_out={self.fan_in_fan_out}"
        )
