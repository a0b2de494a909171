"""Numbers the kernels and the package share, defined once (no Triton import: safe on every platform).

- ``RANKNUM_EPS``: the scale is ``lora_alpha / (ranknum + RANKNUM_EPS)`` (PEFT's 1e-5).
- ``SUPPORTED_DTYPES``: the floating-point dtypes the fused kernels take.
- ``MAX_RANK``: the largest rank the fused kernels take (rank blocks are padded to powers of two).
"""

from __future__ import annotations

import torch

RANKNUM_EPS = 1e-5
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 128
