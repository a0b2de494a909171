"""adalora_fast: a fast, PEFT-exact AdaLoRA runtime for PyTorch and Hugging Face transformers.

Data flow: config -> model -> layer -> functional -> kernels (the adapted layer); model -> allocator
-> scorers -> kernels (the budget); model <-> checkpoint (plain dicts <-> files).
"""

from .allocator import RankAllocator
from .config import AdaLoraConfig
from .functional import orth_regularization
from .integrations import accelerate_peft, from_peft, fully_shard, unwrap_model, update_and_allocate
from .layer import SVDLinear
from .model import AdaLoraModel, get_adalora_model, get_peft_model

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraModel",
    "RankAllocator",
    "SVDLinear",
    "accelerate_peft",
    "from_peft",
    "fully_shard",
    "get_adalora_model",
    "get_peft_model",
    "orth_regularization",
    "unwrap_model",
    "update_and_allocate",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Trainer callback imports transformers' Trainer machinery: only when asked for.
    if name == "AdaLoraCallback":
        from .integrations.trainer import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module 'adalora_fast' has no attribute {name!r}")
