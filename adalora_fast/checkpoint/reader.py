"""A checkpoint folder read and checked as plain data before anything is loaded into a model.

:func:`read_checkpoint` reads the config, the PEFT weights and (for training) our training state;
:meth:`Checkpoint.select` matches them against the modules a model would adapt, given only their
sizes, and returns the factors to load with each module's held pattern. Everything that can be
wrong with a folder raises here, naming the file and the module, before the model is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import AdaLoraConfig
from ..factors import check_factor_shapes
from . import peft_format
from .training_state import TrainingState, read_training_state
from .transaction import finish_interrupted_save


@dataclass
class Checkpoint:
    """What a folder holds: its config, PEFT weights and, when resuming, our training state."""

    path: Path
    config: AdaLoraConfig
    weights: peft_format.Factors
    state: TrainingState | None
    others: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save state, by full key

    def saved_modules(
        self, wrapped: list[str], biases: Mapping[str, str] | None = None
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """``({module: {name: tensor}}, {bias key: tensor})``: the state of the modules to save ``wrapped``
        names, and the trained biases among ``biases`` (their keys); ``ValueError`` naming the file for a
        tensor that belongs to neither (nor to an adapter)."""
        modules: dict[str, dict[str, torch.Tensor]] = {}
        trained: dict[str, torch.Tensor] = {}
        longest_first = sorted(wrapped, key=len, reverse=True)
        for key, t in self.others.items():
            if biases and key in biases:
                trained[key] = t
                continue
            module = next((m for m in longest_first if key.startswith(m + ".")), None)
            if module is None:
                raise ValueError(
                    f"{peft_format.weights_file(self.path)}: unexpected key {peft_format.PREFIX + key!r} "
                    f"(not an AdaLoRA adapter tensor, a module in modules_to_save, nor a bias trained with "
                    f"bias={self.config.bias!r})"
                )
            inner = key[len(module) + 1 :]
            if inner.startswith(("original_module.", "modules_to_save.")):
                continue  # PEFT's bias="all" also writes the wrapper's inner biases: copies of the above
            modules.setdefault(module, {})[inner] = t
        return modules, trained

    @property
    def source(self) -> Path:
        """The file the factors are loaded from (the training state's full ones when resuming)."""
        return self.state.path if self.state is not None else peft_format.weights_file(self.path)

    def select(
        self, sizes: Mapping[str, tuple[int, int]]
    ) -> tuple[peft_format.Factors, dict[str, list[bool] | None]]:
        """The factors to load into the modules ``sizes`` names (``{module: (d_in, d_out)}``: the ones
        the model adapts under this config) and each module's held pattern (None: all init_r ranks)."""
        config, weights_path = self.config, peft_format.weights_file(self.path)
        extra = sorted(set(self.weights) - set(sizes))
        missing = sorted(set(sizes) - set(self.weights))
        if extra:
            raise ValueError(f"{weights_path}: module {extra[0]!r} is not an adapted module of this model")
        if missing:
            raise ValueError(f"{weights_path}: no weights for module {missing[0]!r} of this model")
        config_path = self.path / peft_format.CONFIG_NAME
        pattern_cfg = peft_format.parse_rank_pattern(config.rank_pattern, source=str(config_path)) or {}
        factors: peft_format.Factors = {}
        held: dict[str, list[bool] | None] = {}
        for name, (d_in, d_out) in sizes.items():
            if self.state is not None:
                tensors = self.state.factors(name)
                if any(t is None for t in tensors.values()):
                    raise ValueError(f"{self.state.path}: no full weights for module {name!r}")
                r = check_factor_shapes(tensors, d_in, d_out, f"{self.source}: module {name!r}")
                held[name] = self.state.held_pattern(name)
            else:
                tensors = self.weights[name]
                r = check_factor_shapes(tensors, d_in, d_out, f"{weights_path}: module {name!r}")
                pattern = pattern_cfg.get(name)
                if pattern is not None and (len(pattern) != config.init_r or sum(pattern) != r):
                    raise ValueError(
                        f"{config_path}: rank_pattern of {name!r} keeps {sum(pattern)} of "
                        f"{len(pattern)} ranks but the weights have rank {r} (init_r={config.init_r})"
                    )
                if pattern is None and r != config.init_r:
                    raise ValueError(
                        f"{weights_path}: module {name!r} has rank {r}, init_r is {config.init_r}"
                    )
                held[name] = pattern if r != config.init_r else None
            if r != config.init_r and held[name] is None:
                raise ValueError(f"{self.source}: module {name!r} has rank {r} but no recorded pattern")
            factors[name] = tensors  # type: ignore[assignment]  (checked complete above)
        return factors, held


def read_checkpoint(path: str | Path, trainable: bool) -> Checkpoint:
    """Read the folder ``path``: config, PEFT weights and, when ``trainable``, our training state if
    it belongs to these weights (our own ``compact_after_final`` comes back from it)."""
    root = Path(path)
    if root.is_dir():
        finish_interrupted_save(root)
    config = peft_format.read_config(root)
    weights, others = peft_format.read_weights(root)
    state = read_training_state(root, stacklevel=4) if trainable else None
    if state is not None and state.compact_after_final is not None:
        config.compact_after_final = bool(state.compact_after_final)  # ours: not in adapter_config.json
    return Checkpoint(root, config, weights, state, others)
