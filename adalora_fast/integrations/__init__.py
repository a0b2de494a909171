"""Where adalora_fast meets other libraries: PEFT (:mod:`.peft`, ``from_peft``; :mod:`.peft_inplace`,
``accelerate_peft``), TRL (:mod:`.trl`), transformers' Trainer (:mod:`.trainer`, ``AdaLoraCallback``;
imports transformers' Trainer machinery, so it is imported on demand) and training-loop wrappers
(:mod:`.wrappers`: DDP, torch.compile, accelerate) and FSDP2 (:mod:`.fsdp`, ``fully_shard``)."""

from .fsdp import fully_shard
from .peft import from_peft
from .peft_inplace import accelerate_peft
from .wrappers import unwrap_model, update_and_allocate

__all__ = ["accelerate_peft", "from_peft", "fully_shard", "unwrap_model", "update_and_allocate"]
