"""AdaLoRA configuration: every field of PEFT 0.21's ``AdaLoraConfig``, with PEFT's defaults, validated
eagerly.

Each PEFT field is honoured as PEFT's AdaLoRA honours it, ignored with a warning where PEFT's AdaLoRA
ignores it, or refused with an error naming it (:data:`IGNORED_FIELDS`, :data:`REFUSED_FIELDS`). The
factor names and rank vocabulary are in :mod:`adalora_fast.factors`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .backend import BACKEND_ENV, BACKENDS, requested_backend
from .factors import scale_numerator

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "IGNORED_FIELDS",
    "OUR_FIELDS",
    "REFUSED_FIELDS",
    "TASK_TYPES",
    "AdaLoraConfig",
]

OUR_FIELDS = ("backend", "compact_after_final")  # our extensions, kept out of PEFT's adapter_config.json
CONFIG_NAME = "adapter_config.json"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# LoRA fields that PEFT's AdaLoRA layers never read (it accepts them and does nothing): ignored here
# too, with a warning when they differ from PEFT's default.
IGNORED_FIELDS = {
    "use_rslora": "AdaLoRA's scale is lora_alpha / ranknum, without rsLoRA",
    "alpha_pattern": "AdaLoRA uses one lora_alpha for every module",
    "lora_bias": "AdaLoRA layers have no LoRA bias",
    "use_qalora": "QALoRA is a LoRA variant for GPTQ bases",
    "qalora_group_size": "QALoRA is a LoRA variant for GPTQ bases",
    "alora_invocation_tokens": "aLoRA is a LoRA variant",
    "megatron_config": "PEFT's AdaLoRA has no Megatron layers (only nn.Linear and Conv1D are adapted)",
    "megatron_core": "PEFT's AdaLoRA has no Megatron layers",
    "monteclora_config": "MonteCLoRA is a LoRA variant",
    "runtime_config": "it configures LoRA's DoRA offloading",
    "eva_config": "it is read only with init_lora_weights='eva', which AdaLoRA does not have",
    "corda_config": "it is read only with init_lora_weights='corda', which AdaLoRA does not have",
    "ensure_weight_tying": "it concerns modules_to_save and trainable tokens on tied weights",
}
# Fields that PEFT's AdaLoRA refuses, or whose LoRA feature adalora_fast does not have: an error names
# them when they differ from PEFT's default.
REFUSED_FIELDS = {
    "use_dora": "AdaLoRA does not support DoRA (PEFT refuses it too)",
    "loftq_config": "AdaLoRA does not support LoftQ (PEFT refuses it too)",
    "lora_ga_config": "LoRA-GA is a LoRA initialisation that AdaLoRA does not have",
    "velora_config": "VeLoRA is a LoRA variant that AdaLoRA does not have",
    "use_bdlora": "BD-LoRA is a LoRA variant that AdaLoRA does not have",
    "arrow_config": "Arrow routing is a LoRA variant that AdaLoRA does not have",
    "kasa_config": "KaSA is a LoRA variant that AdaLoRA does not have",
    "target_parameters": "AdaLoRA adapts modules, not nn.Parameters (PEFT's AdaLoRA fails on it too)",
    "trainable_token_indices": "trainable tokens are not supported by adalora_fast",
}


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
    # ---- PEFT's other fields, PEFT's defaults ----
    task_type: str | None = None
    peft_type: str | None = "ADALORA"
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None  # filled in from the model when None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 8  # unused by AdaLoRA (init_r is the rank); PEFT warns when it differs from 8
    fan_in_fan_out: bool = False  # set per module (Conv1D: True), with PEFT's warning when it differs
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, list[bool]] | None = field(default=None, repr=False)
    use_rslora: bool = False
    alpha_pattern: dict[str, Any] = field(default_factory=dict, repr=False)
    lora_bias: bool = False
    use_qalora: bool = False
    qalora_group_size: int = 16
    alora_invocation_tokens: list[int] | None = None
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    monteclora_config: Any = None
    runtime_config: Any = field(default=None, repr=False)
    eva_config: Any = None
    corda_config: Any = None
    ensure_weight_tying: bool = False
    use_dora: bool = False
    loftq_config: Any = field(default_factory=dict)
    lora_ga_config: Any = None
    velora_config: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    target_parameters: list[str] | None = None
    layer_replication: list[tuple[int, int]] | None = None
    trainable_token_indices: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.peft_type = _plain(self.peft_type)
        self.task_type = _plain(self.task_type)
        if self.peft_type is None:
            self.peft_type = "ADALORA"
        if isinstance(self.runtime_config, dict) and not any(self.runtime_config.values()):
            self.runtime_config = None  # PEFT's default LoraRuntimeConfig(), as its to_dict writes it
        self.validate()
        self._warn_ignored()

    def _warn_ignored(self) -> None:
        if self.r != 8:
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                "initial rank, use `init_r` instead.",
                stacklevel=4,
            )
        if isinstance(self.init_lora_weights, str):
            warnings.warn(
                f"init_lora_weights={self.init_lora_weights!r} is a LoRA initialisation that AdaLoRA does "
                "not have; as in PEFT, AdaLoRA's own initialisation is used (E = 0, A and B ~ N(0, 0.02))",
                stacklevel=4,
            )
        for name, why in IGNORED_FIELDS.items():
            value = getattr(self, name)
            if not _is_default(name, value):
                warnings.warn(f"{name}={value!r} is ignored by AdaLoRA: {why}", stacklevel=4)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field. Runs at construction and again where the
        fields are used (the model's construction, ``set_total_step``, every ``update_and_allocate``),
        so fields changed after construction are checked too."""
        if not _is_int(self.init_r) or self.init_r < 1:
            raise ValueError(f"init_r must be an integer >= 1, got {self.init_r!r}")
        if not _is_int(self.target_r) or self.target_r < 0:
            raise ValueError(f"target_r must be an integer >= 0, got {self.target_r!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("beta1", "beta2", "orth_reg_weight", "lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not _is_int(self.deltaT) or self.deltaT < 1:
            raise ValueError(f"deltaT must be an integer >= 1, got {self.deltaT!r}")
        for name in ("target_modules", "exclude_modules"):
            _check_module_spec(name, getattr(self, name))
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
        self._validate_peft_fields()
        if self.total_step is not None:
            self._validate_schedule(self.total_step)

    def _validate_peft_fields(self) -> None:
        if str(self.peft_type).upper() != "ADALORA":
            raise ValueError(
                f"peft_type must be 'ADALORA' (adalora_fast is AdaLoRA only), got {self.peft_type!r}"
            )
        self.peft_type = "ADALORA"
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {self.task_type!r}")
        for name in ("inference_mode", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.init_lora_weights, (bool, str)):
            raise ValueError(f"init_lora_weights must be a bool, got {self.init_lora_weights!r}")
        if self.init_lora_weights == "loftq":
            raise ValueError(f"init_lora_weights='loftq': {REFUSED_FIELDS['loftq_config']}")
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ValueError(f"r must be an integer (it is unused by AdaLoRA; set init_r), got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, (set, tuple)):
                self.modules_to_save = sorted(self.modules_to_save)
            if not isinstance(self.modules_to_save, list) or not all(
                isinstance(m, str) for m in self.modules_to_save
            ):
                raise ValueError(
                    f"modules_to_save must be a list of module names, got {self.modules_to_save!r}"
                )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the layer indices to adapt)")
        if self.layers_to_transform is not None:
            if isinstance(self.target_modules, str):
                raise ValueError("layers_to_transform cannot be used when target_modules is a regex (a str)")
            indices = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else None
            indices = indices or self.layers_to_transform
            if not isinstance(indices, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
            ):
                raise ValueError(
                    f"layers_to_transform must be an int or a list of ints >= 0, got {indices!r}"
                )
        if self.layer_replication is not None:
            pairs = self.layer_replication
            if not isinstance(pairs, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p)
                for p in pairs
            ):
                raise ValueError(f"layer_replication must be a list of [start, end) pairs, got {pairs!r}")
            self.layer_replication = [tuple(p) for p in pairs]
        for name, why in REFUSED_FIELDS.items():
            value = getattr(self, name)
            if not _is_default(name, value):
                raise ValueError(f"{name}={value!r} is not supported: {why}")

    def _validate_schedule(self, total_step: int) -> None:
        if not _is_int(total_step) or total_step <= 0:
            raise ValueError(f"total_step must be a positive integer, got {total_step!r}")
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(
                f"tinit ({self.tinit}) must be < total_step - tfinal ({total_step} - {self.tfinal}): "
                "the schedule leaves no budgeting phase; decrease tinit/tfinal or increase total_step"
            )

    def set_total_step(self, total_step: int) -> None:
        """Fill in ``total_step`` (e.g. from a trainer's planned optimizer steps) and re-validate."""
        self.validate()
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
        """PEFT's ``adapter_config.json`` keys and values (ours, ``backend`` and ``compact_after_final``,
        are left out: older PEFT versions reject unknown fields)."""
        d = asdict(self)
        for ours in OUR_FIELDS:
            d.pop(ours)
        d.pop("runtime_config")  # PEFT does not write it either
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    def to_dict(self) -> dict[str, Any]:
        """Every field, ours included (PEFT's ``PeftConfig.to_dict``)."""
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` (PEFT's keys) into ``save_directory``."""
        out = Path(save_directory)
        if out.is_file():
            raise ValueError(f"save_pretrained: {out} is a file, not a directory")
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(
            json.dumps({**self.to_peft_dict(), **kwargs}, indent=2, sort_keys=True)
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> AdaLoraConfig:
        """The config in ``<dir>[/subfolder]/adapter_config.json`` (a local folder); ``kwargs`` override
        its fields."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {folder}: not a PEFT/adalora_fast adapter checkpoint (a local folder)"
            )
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a config (a JSON object), got a {type(d).__name__}")
        return cls.from_peft_dict({**d, **kwargs}, source=str(path))

    @classmethod
    def coerce(cls, config: Any) -> AdaLoraConfig:
        """Ours as it is; a ``peft.AdaLoraConfig`` object or a dict of PEFT's fields as ours."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_peft_dict(config)
        if hasattr(config, "to_dict") and hasattr(config, "peft_type"):
            return cls.from_peft_dict(config.to_dict())
        raise TypeError(
            f"config must be an AdaLoraConfig (ours or PEFT's) or a dict, got {type(config).__name__}"
        )

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> AdaLoraConfig:
        """A config from PEFT's keys (a PEFT ``to_dict()`` or a parsed ``adapter_config.json``); keys that
        are not fields (newer PEFT versions) are refused with an error naming ``source``."""
        peft_type = _plain(d.get("peft_type"))
        if peft_type is not None and str(peft_type).upper() != "ADALORA":
            raise ValueError(
                f"{source} has peft_type {peft_type!r}; adalora_fast loads ADALORA adapters only"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown AdaLoraConfig fields {unknown} (a newer PEFT version?)")
        try:
            return cls(**d)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_module_spec(name: str, spec: Any) -> None:
    """``target_modules`` / ``exclude_modules``: None, a regular expression (compiled here) or a list of
    module-name suffixes."""
    if spec is None:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{name}={spec!r} is not a valid regular expression ({err})") from None
        return
    if not isinstance(spec, (list, tuple, set)) or not all(isinstance(t, str) for t in spec):
        raise ValueError(f"{name} must be a regular expression (str) or a list of module names, got {spec!r}")


def _plain(value: Any) -> Any:
    """PEFT's enums (``PeftType.ADALORA``, ``TaskType.CAUSAL_LM``) as their string values."""
    return getattr(value, "value", value)


def _is_default(name: str, value: Any) -> bool:
    """Whether ``value`` is the field's default (PEFT's); ``None`` and ``{}`` both mean "not set"."""
    spec = _FIELDS[name]
    default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
    return value is None or value == default or (isinstance(value, dict) and not value and not default)


_FIELDS = {f.name: f for f in fields(AdaLoraConfig)}
