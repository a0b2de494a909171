"""AdaLoraConfig validation, backend resolution, PEFT dict round trips and PEFT's defaults."""

from __future__ import annotations

import pytest

import adalora_fast as af
from adalora_fast.config import BACKEND_ENV
from tests.helpers import tiny_llama

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(init_r=4, target_r=5), "target_r"),
        (dict(init_r=0, target_r=0), "init_r"),
        (dict(init_r=-3, target_r=0), "init_r"),
        (dict(target_r=-1), "target_r"),
        (dict(deltaT=0), "deltaT"),
        (dict(deltaT=-2), "deltaT"),
        (dict(beta1=0.0), "beta1"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta1=-0.5), "beta1"),
        (dict(beta1=1.5), "beta1"),
        (dict(beta2=0.0), "beta2"),
        (dict(beta2=1.0), "beta2"),
        (dict(beta2=-0.5), "beta2"),
        (dict(beta2=1.5), "beta2"),
        (dict(orth_reg_weight=-0.1), "orth_reg_weight"),
        (dict(total_step=0), "total_step"),
        (dict(total_step=-5), "total_step"),
        (dict(tinit=-1), "tinit"),
        (dict(tfinal=-1), "tfinal"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(backend="cuda"), "backend"),
        (dict(compact_after_final=1), "compact_after_final"),
        (dict(compact_after_final="yes"), "compact_after_final"),
    ],
)
def test_invalid_field_raises_naming_it(kwargs, field):
    with pytest.raises(ValueError, match=field):
        af.AdaLoraConfig(**kwargs)


@pytest.mark.parametrize(
    "tinit, tfinal, total_step",
    [(10, 0, 10), (5, 5, 10), (0, 10, 10), (3, 8, 10), (11, 0, 10)],
)
def test_schedule_without_budgeting_phase_raises(tinit, tfinal, total_step):
    with pytest.raises(ValueError, match="tinit"):
        af.AdaLoraConfig(tinit=tinit, tfinal=tfinal, total_step=total_step)


@pytest.mark.parametrize("tinit, tfinal, total_step", [(0, 0, 1), (4, 5, 10), (9, 0, 10), (0, 9, 10)])
def test_schedule_with_budgeting_phase_accepted(tinit, tfinal, total_step):
    cfg = af.AdaLoraConfig(tinit=tinit, tfinal=tfinal, total_step=total_step)
    assert cfg.total_step == total_step


def test_edge_values_accepted():
    cfg = af.AdaLoraConfig(init_r=1, target_r=1, deltaT=1, beta1=1e-6, beta2=1 - 1e-6, orth_reg_weight=0.0)
    assert (cfg.init_r, cfg.target_r, cfg.orth_reg_weight) == (1, 1, 0.0)
    assert af.AdaLoraConfig(init_r=5, target_r=0).target_r == 0


def test_total_step_none_accepted_even_with_large_tinit():
    cfg = af.AdaLoraConfig(total_step=None, tinit=100, tfinal=100)
    assert cfg.total_step is None


def test_set_total_step_validates():
    cfg = af.AdaLoraConfig(tinit=10, tfinal=5)
    for bad in (0, -1, 15, 12):
        with pytest.raises(ValueError, match="total_step|tinit"):
            cfg.set_total_step(bad)
        assert cfg.total_step is None, "a rejected total_step must not be stored"
    with pytest.raises(ValueError, match="total_step"):
        cfg.set_total_step(0)
    with pytest.raises(ValueError, match="tinit"):
        cfg.set_total_step(15)
    cfg.set_total_step(16)
    assert cfg.total_step == 16


def test_set_total_step_on_model():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(tinit=3))
    with pytest.raises(ValueError, match="tinit"):
        model.set_total_step(3)
    model.set_total_step(20)
    assert model.adalora_config.total_step == 20


def test_backend_env_override(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    cfg = af.AdaLoraConfig(backend="triton")
    assert cfg.resolved_backend == "triton"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert cfg.resolved_backend == "torch"
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert cfg.resolved_backend == "auto"
    monkeypatch.setenv(BACKEND_ENV, "")
    assert cfg.resolved_backend == "triton"


def test_backend_env_invalid_value(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    cfg = af.AdaLoraConfig()
    with pytest.raises(ValueError, match=BACKEND_ENV):
        cfg.resolved_backend  # noqa: B018


def test_backend_env_reaches_model(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(backend="auto"))
    assert model.backend == "torch"
    assert all(layer.backend == "torch" for _, layer in model.adapted_layers)


def test_from_peft_dict_rejects_lora():
    d = af.AdaLoraConfig(total_step=10).to_peft_dict()
    d["peft_type"] = "LORA"
    with pytest.raises(ValueError, match="peft_type"):
        af.AdaLoraConfig.from_peft_dict(d)


def test_peft_dict_round_trip():
    cfg = af.AdaLoraConfig(
        init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=3, total_step=30, target_modules=["q_proj", "v_proj"]
    )
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "ADALORA"
    assert "backend" not in d
    assert "compact_after_final" not in d
    back = af.AdaLoraConfig.from_peft_dict(d)
    for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "target_modules"):
        assert getattr(back, name) == getattr(cfg, name), name


def test_from_peft_dict_accepts_peft_json(tmp_path):
    import json

    peft.AdaLoraConfig(total_step=10, init_r=6, target_r=3, target_modules=["q_proj"]).save_pretrained(
        tmp_path
    )
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg = af.AdaLoraConfig.from_peft_dict(d)
    assert (cfg.init_r, cfg.target_r, cfg.total_step, cfg.target_modules) == (6, 3, 10, ["q_proj"])


def test_from_peft_dict_accepts_peft_to_dict():
    d = peft.AdaLoraConfig(total_step=10, init_r=6, target_r=3).to_dict()
    cfg = af.AdaLoraConfig.from_peft_dict(d)
    assert (cfg.init_r, cfg.target_r, cfg.total_step) == (6, 3, 10)


def test_defaults_equal_peft_defaults():
    ours = af.AdaLoraConfig()
    theirs = peft.AdaLoraConfig(total_step=10)
    for name in (
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "lora_alpha",
        "lora_dropout",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.total_step is None
    assert ours.backend == "auto"


def test_set_and_tuple_targets_normalised():
    cfg = af.AdaLoraConfig(target_modules={"v_proj", "q_proj"}, exclude_modules=("b", "a"))
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.exclude_modules == ["a", "b"]


@pytest.mark.parametrize("targets", [["no_such_module"], r".*\.nothing_here"])
def test_get_adalora_model_no_match_raises(targets):
    with pytest.raises(ValueError, match="target_modules"):
        af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(target_modules=targets))


@pytest.mark.parametrize(
    "field,value",
    [("tinit", "3"), ("tfinal", 1.5), ("beta1", "x"), ("lora_alpha", None), ("orth_reg_weight", "1")],
)
def test_wrong_types_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        af.AdaLoraConfig(**{field: value})


def test_compact_after_final_is_ours_not_peft():
    cfg = af.AdaLoraConfig(total_step=10, compact_after_final=True)
    d = cfg.to_peft_dict()
    assert "compact_after_final" not in d
    peft.AdaLoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})  # PEFT accepts what we write
    assert af.AdaLoraConfig().compact_after_final is False
