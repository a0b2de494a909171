"""Checkpoint files as plain data: PEFT's adapter format (:mod:`.peft_format`), our training state
(:mod:`.training_state`) and the LoRA export (:mod:`.lora_export`). Nothing here sees a model: the
model (:meth:`adalora_fast.AdaLoraModel.save_pretrained` / ``from_pretrained``) hands over and takes
back ``{module: {factor: tensor}}`` dicts, configs and allocator state dicts.
"""

from .peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, parse_rank_pattern
from .training_state import NONFINITE_KEY, STATE_FORMAT, STATE_NAME

__all__ = [
    "CONFIG_NAME",
    "NONFINITE_KEY",
    "PREFIX",
    "STATE_FORMAT",
    "STATE_NAME",
    "WEIGHTS_NAME",
    "parse_rank_pattern",
]
