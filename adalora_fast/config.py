"""AdaLoRA configuration: PEFT's field names and defaults, validated eagerly.

The factor names and rank vocabulary are in :mod:`adalora_fast.factors`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .backend import BACKEND_ENV, BACKENDS, requested_backend
from .factors import scale_numerator

__all__ = ["BACKENDS", "BACKEND_ENV", "OUR_FIELDS", "AdaLoraConfig"]

OUR_FIELDS = ("backend", "compact_after_final")  # our extensions, kept out of PEFT's adapter_config.json


@dataclass
class AdaLoraConfig:
    """Hyper-parameters of AdaLoRA (Zhang et al., ICLR 2023), named as in PEFT's ``AdaLoraConfig``.

    ``total_step`` may stay ``None`` until training starts (a Trainer callback fills it in);
    :meth:`adalora_fast.AdaLoraModel.update_and_allocate` raises until it is set.

    Fields that are ours, not PEFT's (left out of ``adapter_config.json``): ``backend`` (a load-time
    choice) and ``compact_after_final``: when True, once the rank pattern is fixed at step
    ``total_step - tfinal`` every layer's A, E, B are shrunk in place to the kept ranks (see
    :meth:`adalora_fast.AdaLoraModel.compact`), so the final phase trains at the target rank;
    ``update_and_allocate(step, optimizer=opt)`` then needs the optimizer to slice its state. It is
    kept across our own save/load through the training-state file.
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    backend: str = "auto"
    compact_after_final: bool = False
    # PEFT fields kept so checkpoints round-trip; fan_in_fan_out is detected per module (Conv1D).
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    rank_pattern: dict[str, list[bool]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""
        if not isinstance(self.init_r, int) or self.init_r < 1:
            raise ValueError(f"init_r must be an integer >= 1, got {self.init_r!r}")
        if not isinstance(self.target_r, int) or self.target_r < 0:
            raise ValueError(f"target_r must be an integer >= 0, got {self.target_r!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("beta1", "beta2", "orth_reg_weight", "lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.deltaT, int) or self.deltaT < 1:
            raise ValueError(f"deltaT must be an integer >= 1, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.compact_after_final, bool):
            raise ValueError(f"compact_after_final must be a bool, got {self.compact_after_final!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.total_step is not None:
            self._validate_schedule(self.total_step)

    def _validate_schedule(self, total_step: int) -> None:
        if not isinstance(total_step, int) or total_step <= 0:
            raise ValueError(f"total_step must be a positive integer, got {total_step!r}")
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(
                f"tinit ({self.tinit}) must be < total_step - tfinal ({total_step} - {self.tfinal}): "
                "the schedule leaves no budgeting phase; decrease tinit/tfinal or increase total_step"
            )

    def set_total_step(self, total_step: int) -> None:
        """Fill in ``total_step`` (e.g. from a trainer's planned optimizer steps) and re-validate."""
        self._validate_schedule(total_step)
        self.total_step = total_step

    @property
    def resolved_backend(self) -> str:
        """The requested backend; the ``ADALORA_FAST_BACKEND`` environment variable overrides it."""
        return requested_backend(self.backend)

    def scaling(self) -> float:
        """PEFT's numerator of the adapter scale: lora_alpha, or init_r when lora_alpha <= 0."""
        return scale_numerator(self.lora_alpha, self.init_r)

    # ---- PEFT adapter_config.json ------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The fields PEFT's ``AdaLoraConfig`` reads; unknown-to-us PEFT fields keep PEFT defaults."""
        d = asdict(self)
        for ours in OUR_FIELDS:  # not PEFT's: older PEFT versions reject unknown fields
            d.pop(ours)
        d.update(
            peft_type="ADALORA",
            r=8,  # unused by AdaLoRA; PEFT warns when it differs from its default
            bias="none",
            fan_in_fan_out=False,
            inference_mode=False,
            init_lora_weights=True,
            modules_to_save=None,
        )
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> AdaLoraConfig:
        peft_type = d.get("peft_type")
        peft_type = getattr(peft_type, "value", peft_type)  # PEFT's in-memory dicts hold an enum
        if peft_type is not None and str(peft_type).upper() != "ADALORA":
            raise ValueError(
                f"adapter_config.json has peft_type {peft_type!r}; adalora_fast loads ADALORA adapters only"
            )
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        return cls(**kwargs)
