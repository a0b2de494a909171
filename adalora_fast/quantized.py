"""Quantised base layers: bitsandbytes' ``Linear4bit`` (nf4 / fp4, any compute dtype, with or without
double quantisation) and ``Linear8bitLt`` (int8, ``has_fp16_weights=False``).

The adapted layer trains on them through the base layer's own forward (bitsandbytes' kernels) plus
the low-rank term. Merging follows PEFT's LoRA on the same bases: the weight is dequantised, dW is
added in fp32, and the sum is quantised again with the weight's own settings. The re-quantisation
rounds W + dW onto the format's grid, so a merged layer's output differs from the unmerged one by
up to one quantisation step per weight:

- nf4 / fp4: half the largest gap between neighbouring code values, times the block's absmax
  (``NF4_MAX_HALF_GAP`` / ``FP4_MAX_HALF_GAP``);
- int8 (row-wise absmax): half of ``absmax(row) / 127``.

bitsandbytes is imported only when such a layer is met (it is optional).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["dequantize", "int8_scales", "quantization", "requantize_"]

# Half the largest gap between neighbouring code values of bitsandbytes' 4-bit formats (their code
# tables, in units of the block absmax): nf4 -1.0 -> -0.6962, fp4 0.6667 -> 1.0 (4 -> 6 of 6).
NF4_MAX_HALF_GAP = (1.0 - 0.6961928009986877) / 2
FP4_MAX_HALF_GAP = (1.0 - 0.6666666865348816) / 2


def quantization(base: nn.Module) -> str | None:
    """``"4bit"`` or ``"8bit"`` for a bitsandbytes base layer (by its weight's class), else None."""
    name = type(getattr(base, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(name)


def dequantize(base: nn.Module) -> torch.Tensor:
    """The base weight in fp32, ``(d_out, d_in)``, as bitsandbytes dequantises it."""
    import bitsandbytes as bnb

    weight, kind = base.weight, quantization(base)
    if kind == "4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "8bit":
        scb = int8_scales(base)
        if scb is None:
            raise ValueError(f"{type(base).__name__}: its int8 weight has no scales (SCB) yet")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()
    raise TypeError(f"{type(base).__name__} is not a bitsandbytes 4-bit or 8-bit layer")


def int8_scales(base: nn.Module) -> torch.Tensor | None:
    """The row scales of an int8 base: on the weight until the first forward, then in the layer's
    state (bitsandbytes moves them); None for other layers."""
    if quantization(base) != "8bit":
        return None
    return base.state.SCB if base.state.SCB is not None else base.weight.SCB


def requantize_(base: nn.Module, w: torch.Tensor) -> None:
    """Quantise ``w`` (``(d_out, d_in)``) into a new weight of ``base``'s format and settings."""
    import bitsandbytes as bnb

    weight, kind = base.weight, quantization(base)
    if kind == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs.update(bnb_quantized=False, requires_grad=False)
        w = w.to(weight.quant_state.dtype)
        base.weight = bnb.nn.Params4bit(w.to("cpu"), **kwargs).to(weight.device)
    elif kind == "8bit":
        new = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights)
        base.weight = new.to(weight.device)
        base.state.reset_grads()
        base.state.SCB = base.weight.SCB
        base.state.CB = base.weight.data
    else:
        raise TypeError(f"{type(base).__name__} is not a bitsandbytes 4-bit or 8-bit layer")
