"""Where adalora_fast meets other libraries: PEFT (:mod:`.peft`, ``from_peft``), transformers'
Trainer (:mod:`.trainer`, ``AdaLoraCallback``; imports transformers' Trainer machinery, so it is
imported on demand) and training-loop wrappers (:mod:`.wrappers`: DDP, torch.compile, accelerate)."""

from .peft import from_peft
from .wrappers import unwrap_model, update_and_allocate

__all__ = ["from_peft", "unwrap_model", "update_and_allocate"]
