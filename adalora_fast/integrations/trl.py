"""TRL's trainers with an :class:`~adalora_fast.AdaLoraModel`.

TRL's trainers (``SFTTrainer``, ``GRPOTrainer``, ...) compute their loss from per-token
log-probabilities: in ``__init__`` they give the model a fused LM head, ``trl.trainer.utils.
add_fused_lm_head(model)``, which replaces ``model.forward`` with one that runs ``model.base_model``
(the backbone of a transformers model) and projects through ``model.get_output_embeddings()`` in
tiles. For a PEFT model TRL passes ``get_base_model()``; for ours it would pass the wrapper, whose
``base_model`` is the wrapper itself (PEFT's tuner role), and the forward would fail.
:func:`redirect_fused_lm_head` wraps TRL's function (once, where TRL's modules hold it) so that it
patches the transformers model inside an AdaLoraModel instead; our forward then passes
``fused_lm_head=True`` through to it. TRL never reads ``outputs.loss``, so the regulariser is added to
the loss its ``compute_loss`` returns, by the Trainer integration (:mod:`.trainer`).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any

from .wrappers import find_adalora_model

_NAME = "add_fused_lm_head"


def _redirected(original):
    @functools.wraps(original)
    def add_fused_lm_head(model: Any, *args: Any, **kwargs: Any) -> Any:
        adalora = find_adalora_model(model)
        return original(model if adalora is None else adalora.model, *args, **kwargs)

    add_fused_lm_head.__adalora_fast__ = True  # type: ignore[attr-defined]
    return add_fused_lm_head


def redirect_fused_lm_head() -> None:
    """Wrap TRL's ``add_fused_lm_head`` in ``trl.trainer.utils`` and in every TRL module already
    imported that holds it (they import the name); nothing when TRL is not installed."""
    if importlib.util.find_spec("trl") is None:
        return
    try:
        import trl.trainer.utils as utils
    except ImportError:  # a TRL that does not import here cannot be the trainer in use
        return

    original = getattr(utils, _NAME, None)
    if original is None:
        return  # a TRL without the fused head
    if not getattr(original, "__adalora_fast__", False):
        setattr(utils, _NAME, _redirected(original))
    wrapped = getattr(utils, _NAME)
    for name, module in list(sys.modules.items()):
        if name.startswith("trl.") and getattr(module, _NAME, None) is original:
            setattr(module, _NAME, wrapped)
