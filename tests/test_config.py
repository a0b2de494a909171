"""AdaLoraConfig validation, backend resolution, PEFT dict round trips and PEFT's defaults."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

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


# ---- every field of PEFT's AdaLoraConfig: honoured, warned-and-ignored, or refused ----------------------
_LLAMA_Q = "model.layers.0.self_attn.q_proj.lora_E"
# field -> (a non-default value, how ours treats it). "honoured" fields are tested for behaviour in
# tests/test_targets.py (targets, layers), tests/integration/test_peft_model_api.py (inference_mode)
# and below (init_lora_weights, task_type, peft_type, r, fan_in_fan_out, the metadata fields).
PEFT_FIELD_CASES = {
    "task_type": ("CAUSAL_LM", "honoured"),
    "peft_type": ("ADALORA", "honoured"),
    "auto_mapping": ({"base_model_class": "LlamaForCausalLM"}, "honoured"),
    "peft_version": ("0.21.2", "honoured"),
    "base_model_name_or_path": ("some/base", "honoured"),
    "revision": ("main", "honoured"),
    "inference_mode": (True, "honoured"),
    "r": (4, "warned"),
    "target_modules": (["q_proj"], "honoured"),
    "exclude_modules": (["k_proj"], "honoured"),
    "lora_alpha": (16, "honoured"),
    "lora_dropout": (0.1, "honoured"),
    "fan_in_fan_out": (True, "honoured"),
    "bias": ("all", "honoured"),
    "use_rslora": (True, "ignored"),
    "modules_to_save": (["lm_head"], "honoured"),
    "init_lora_weights": (False, "honoured"),
    "layers_to_transform": ([0], "honoured"),
    "layers_pattern": ("layers", "honoured"),
    "rank_pattern": ({_LLAMA_Q: [True] * 12}, "honoured"),
    "alpha_pattern": ({"q_proj": 4}, "ignored"),
    "megatron_config": ({"tensor_model_parallel_size": 2}, "ignored"),
    "megatron_core": ("megatron.other", "ignored"),
    "trainable_token_indices": ([1, 2], "refused"),
    "loftq_config": ({"loftq_bits": 4}, "refused"),
    "eva_config": ({"rho": 2.0}, "ignored"),
    "corda_config": ({"cache_file": "x"}, "ignored"),
    "lora_ga_config": ({"direction": "ArB2r"}, "refused"),
    "use_dora": (True, "refused"),
    "velora_config": ({"rank": 2}, "refused"),
    "alora_invocation_tokens": ([1, 2], "ignored"),
    "use_qalora": (True, "ignored"),
    "qalora_group_size": (8, "ignored"),
    "monteclora_config": ({"n": 2}, "ignored"),
    "layer_replication": ([(0, 1)], "honoured"),
    "runtime_config": ({"ephemeral_gpu_offload": True}, "ignored"),
    "lora_bias": (True, "ignored"),
    "target_parameters": (["mlp.up_proj.weight"], "refused"),
    "use_bdlora": ({"nblocks": 2}, "refused"),
    "arrow_config": ({"top_k": 2}, "refused"),
    "kasa_config": ({"k": 2}, "refused"),
    "ensure_weight_tying": (True, "ignored"),
    "target_r": (4, "honoured"),
    "init_r": (16, "honoured"),
    "tinit": (1, "honoured"),
    "tfinal": (1, "honoured"),
    "deltaT": (2, "honoured"),
    "beta1": (0.5, "honoured"),
    "beta2": (0.5, "honoured"),
    "orth_reg_weight": (0.1, "honoured"),
    "total_step": (20, "honoured"),
}


def test_the_table_covers_every_field_of_peft_s_config():
    import dataclasses

    assert set(PEFT_FIELD_CASES) == {f.name for f in dataclasses.fields(peft.AdaLoraConfig)}
    ours = {f.name for f in dataclasses.fields(af.AdaLoraConfig)}
    assert set(PEFT_FIELD_CASES) <= ours


@pytest.mark.parametrize("field", sorted(PEFT_FIELD_CASES))
def test_every_peft_field_is_honoured_warned_or_refused(field):
    value, kind = PEFT_FIELD_CASES[field]
    base = {"total_step": 20, "target_modules": ["q_proj", "v_proj"]}
    if field == "layers_pattern":
        base["layers_to_transform"] = [0]
    kwargs = {**base, field: value}
    if kind == "refused":
        with pytest.raises(ValueError, match=field):
            af.AdaLoraConfig(**kwargs)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = af.AdaLoraConfig(**kwargs)
    ours_warned = [str(w.message) for w in caught if f"{field}" in str(w.message) or field == "r"]
    if kind in ("ignored", "warned"):
        assert ours_warned, f"{field}={value!r} is ignored by AdaLoRA: ours must say so"
    else:
        assert not caught, [str(w.message) for w in caught]
    # the value is kept and written where PEFT writes it (PEFT reads it back)
    if field != "runtime_config":  # PEFT does not write runtime_config to adapter_config.json
        assert cfg.to_peft_dict()[field] == value
        assert af.AdaLoraConfig.from_peft_dict(cfg.to_peft_dict()).to_peft_dict() == cfg.to_peft_dict()


@pytest.mark.parametrize("field", sorted(f for f, (_, kind) in PEFT_FIELD_CASES.items() if kind == "ignored"))
def test_ignored_fields_change_nothing_in_peft_either(field):
    """What ours ignores, PEFT's AdaLoRA ignores too: its model computes the same outputs with the
    field set as without it."""
    value, _ = PEFT_FIELD_CASES[field]
    if field in ("eva_config", "corda_config", "runtime_config", "megatron_config", "monteclora_config"):
        pytest.skip(f"PEFT validates {field} as its own config class; ignored because it is never read")
    x = torch.randint(0, 64, (2, 5))

    def peft_logits(**extra):
        torch.manual_seed(0)
        pm = peft.get_peft_model(
            tiny_llama(), peft.AdaLoraConfig(total_step=20, target_modules=["q_proj"], **extra)
        )
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_E" in n:
                    p.fill_(0.5)
            return pm(input_ids=x).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(peft_logits(**{field: value}), peft_logits(), rtol=0, atol=0)


def test_a_peft_config_object_or_its_dict_is_accepted_wherever_ours_is(tmp_path):
    pcfg = peft.AdaLoraConfig(
        peft_type="ADALORA",
        task_type="CAUSAL_LM",
        init_r=6,
        target_r=2,
        total_step=20,
        target_modules=["q_proj"],
    )
    for given in (pcfg, pcfg.to_dict()):
        model = af.get_adalora_model(tiny_llama(), given)
        assert isinstance(model.adalora_config, af.AdaLoraConfig)
        assert model.adalora_config.init_r == 6 and model.adalora_config.task_type == "CAUSAL_LM"
        assert model.adapted_names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        af.AdaLoraConfig.coerce(peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="AdaLoraConfig"):
        af.AdaLoraConfig.coerce(42)


def test_config_save_and_from_pretrained_match_peft_s(tmp_path):
    common = dict(total_step=20, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_r=6)
    common["target_r"] = 2
    ours = af.AdaLoraConfig(**common)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.AdaLoraConfig(**common)
    theirs.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(mine) == set(peft_json)
    assert sorted(mine.pop("target_modules")) == sorted(peft_json.pop("target_modules"))  # a set in PEFT
    differ = {k for k in mine if mine[k] != peft_json[k]}
    assert differ <= {"peft_version"}, differ  # PEFT writes its own version
    loaded = peft.AdaLoraConfig.from_pretrained(tmp_path / "ours")
    assert loaded.init_r == 6 and sorted(loaded.target_modules) == ["q_proj", "v_proj"]
    back = af.AdaLoraConfig.from_pretrained(tmp_path / "peft")
    assert back.to_peft_dict() == {
        **mine,
        "peft_version": back.peft_version,
        "target_modules": ["q_proj", "v_proj"],
    }
    assert af.AdaLoraConfig.from_pretrained(tmp_path, subfolder="ours").init_r == 6
    assert af.AdaLoraConfig.from_pretrained(tmp_path / "ours", init_r=8).init_r == 8
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        af.AdaLoraConfig.from_pretrained(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="bad.*not valid JSON"):
        af.AdaLoraConfig.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown AdaLoraConfig fields \\['from_the_future'\\]"):
        af.AdaLoraConfig.from_peft_dict({**mine, "from_the_future": 1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(peft_type="LORA"), "peft_type"),
        (dict(task_type="SEQ_CLASSIFICATION"), "task_type must be None or one of"),
        (dict(modules_to_save="classifier"), "modules_to_save must be a list"),
        (dict(init_lora_weights="loftq"), "init_lora_weights='loftq'"),
        (dict(init_lora_weights=3), "init_lora_weights"),
        (dict(inference_mode="yes"), "inference_mode"),
        (dict(bias="some"), "bias must be"),
        (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
        (dict(layers_to_transform=[0], target_modules=r".*q_proj"), "layers_to_transform cannot"),
        (dict(layers_to_transform=[-1], target_modules=["q_proj"]), "layers_to_transform must"),
        (dict(r=2.5), "r must be an integer"),
    ],
)
def test_peft_field_values_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        af.AdaLoraConfig(**kwargs)


def test_peft_enums_are_accepted_as_their_values():
    cfg = af.AdaLoraConfig(peft_type=peft.PeftType.ADALORA, task_type=peft.TaskType.CAUSAL_LM)
    assert cfg.peft_type == "ADALORA" and cfg.task_type == "CAUSAL_LM"
    assert af.AdaLoraConfig(peft_type=None).peft_type == "ADALORA"


def test_r_warns_as_peft_does():
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        af.AdaLoraConfig(r=4)
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        peft.AdaLoraConfig(r=4, total_step=10)


def test_init_lora_weights_false_draws_peft_s_values():
    """init_lora_weights=False keeps PEFT's raw draws (A, E, B ~ N(0, 1)), seed for seed."""
    for init in (True, False):
        torch.manual_seed(3)
        pm = peft.get_peft_model(
            tiny_llama(), peft.AdaLoraConfig(total_step=20, target_modules=["q_proj"], init_lora_weights=init)
        )
        torch.manual_seed(3)
        ours = af.get_adalora_model(
            tiny_llama(), af.AdaLoraConfig(total_step=20, target_modules=["q_proj"], init_lora_weights=init)
        )
        theirs = dict(pm.base_model.model.named_modules())
        for name, layer in ours.adapted_layers:
            for k in ("lora_A", "lora_E", "lora_B"):
                torch.testing.assert_close(
                    getattr(layer, k), getattr(theirs[name], k)["default"], rtol=0, atol=0
                )
        assert bool((ours.adapted_layers[0][1].lora_E != 0).any()) is (not init)


# ---- holes: non-finite numbers, bools for ints, target specs, fields changed later, adapted models -----
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(orth_reg_weight=NAN), "orth_reg_weight must be finite"),
        (dict(orth_reg_weight=INF), "orth_reg_weight must be finite"),
        (dict(lora_alpha=NAN), "lora_alpha must be finite"),
        (dict(lora_alpha=-INF), "lora_alpha must be finite"),
        (dict(beta1=NAN), "beta1 must be finite"),
        (dict(lora_dropout=NAN), "lora_dropout must be finite"),
        (dict(target_r=False), "target_r must be an integer"),
        (dict(init_r=True), "init_r must be an integer"),
        (dict(tinit=True), "tinit must be an integer"),
        (dict(deltaT=True), "deltaT must be an integer"),
        (dict(total_step=True), "total_step must be a positive integer"),
        (dict(target_modules=3), "target_modules must be a regular expression"),
        (dict(target_modules=["q_proj", 2]), "target_modules must be a regular expression"),
        (dict(target_modules="(q_proj"), r"target_modules='\(q_proj' is not a valid regular expression"),
        (dict(exclude_modules="[a-"), "exclude_modules='\\[a-' is not a valid regular expression"),
        (dict(exclude_modules={"a": 1}), "exclude_modules must be a regular expression"),
    ],
)
def test_config_holes_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        af.AdaLoraConfig(**{"target_modules": ["q_proj"], "total_step": 10, **kwargs})


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("deltaT", 0, "deltaT must be an integer >= 1"),
        ("orth_reg_weight", NAN, "orth_reg_weight must be finite"),
        ("target_r", 99, r"target_r \(99\) must not exceed init_r"),
        ("tinit", 20, r"tinit \(20\) must be < total_step - tfinal"),
        ("target_modules", 7, "target_modules must be a regular expression"),
    ],
)
def test_fields_changed_after_construction_are_checked_where_used(field, value, match):
    from tests.helpers import LLAMA_PROJ, allocator_state, draw_grads, set_grads

    def good() -> af.AdaLoraConfig:
        return af.AdaLoraConfig(
            target_modules=LLAMA_PROJ, init_r=4, target_r=2, tinit=1, tfinal=2, total_step=10
        )

    config = good()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        af.get_adalora_model(tiny_llama(2), config)
    model = af.get_adalora_model(tiny_llama(2), good())
    setattr(model.adalora_config, field, value)
    set_grads(model, draw_grads(model, torch.Generator().manual_seed(0)))
    before = allocator_state(model)
    with pytest.raises(ValueError, match=match):
        model.update_and_allocate(0)
    after = allocator_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=match):
        model.set_total_step(12)


def test_an_adapted_model_is_refused():
    model = af.get_adalora_model(tiny_llama(2), af.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    with pytest.raises(
        ValueError, match=r"already adapted by adalora_fast \(module 'model.layers.0.self_attn.q_proj'"
    ):
        af.get_adalora_model(model.model, af.AdaLoraConfig(target_modules=r".*q_proj.*", total_step=10))
    assert all(not n.endswith("base_layer.base_layer") for n, _ in model.named_modules())


@pytest.mark.parametrize(
    "targets, module, kind",
    [
        (["input_layernorm"], "model.layers.0.input_layernorm", "LlamaRMSNorm"),
        (["embed_tokens"], "model.embed_tokens", "Embedding"),
        (r".*\.norm", "model.norm", "LlamaRMSNorm"),
    ],
)
def test_a_target_we_cannot_adapt_is_refused_by_name(targets, module, kind):
    base = tiny_llama(2)
    with pytest.raises(ValueError, match=f"target module '{module}': unsupported base layer {kind}"):
        af.get_adalora_model(base, af.AdaLoraConfig(target_modules=targets, total_step=10))
    assert not any(type(m).__name__ == "SVDLinear" for m in base.modules())
