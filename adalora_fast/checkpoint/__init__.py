"""Checkpoint files as plain data: PEFT's adapter format (:mod:`.peft_format`), our training state
(:mod:`.training_state`) and the LoRA export (:mod:`.lora_export`). Nothing here sees a model: the
model (:meth:`adalora_fast.AdaLoraModel.save_pretrained` / ``from_pretrained``) hands over and takes
back ``{module: {factor: tensor}}`` dicts, configs and allocator state dicts.
"""

from . import transaction
from .peft_format import (
    BIN_WEIGHTS_NAME,
    CONFIG_NAME,
    MODEL_CARD_NAME,
    PREFIX,
    WEIGHTS_NAME,
    parse_rank_pattern,
)
from .training_state import NONFINITE_KEY, STATE_FORMAT, STATE_NAME

# Every file a save writes into a checkpoint folder (each save changes them together: .transaction).
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, BIN_WEIGHTS_NAME, MODEL_CARD_NAME, STATE_NAME)
transaction.own(CHECKPOINT_FILES)  # the only files a commit record may name

__all__ = [
    "CHECKPOINT_FILES",
    "CONFIG_NAME",
    "NONFINITE_KEY",
    "PREFIX",
    "STATE_FORMAT",
    "STATE_NAME",
    "WEIGHTS_NAME",
    "parse_rank_pattern",
]
