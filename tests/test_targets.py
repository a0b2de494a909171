"""find_target_modules: PEFT's defaults and "all-linear" (side by side with PEFT), our "all-projections",
list (suffix) and string (full regex) specs, layers_to_transform, exclusions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adalora_fast as af
from adalora_fast.targets import ALL_PROJECTIONS, find_target_modules
from tests.helpers import LLAMA_PROJ, tiny_bert, tiny_gpt2, tiny_llama, tiny_model


def _llama_names(layers: int = 2, projs=LLAMA_PROJ) -> list[str]:
    out = []
    for i in range(layers):
        for p in projs:
            part = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(f"model.layers.{i}.{part}.{p}")
    return out


def test_all_projections_llama_picks_all_seven():
    model = tiny_llama()
    names = find_target_modules(model, ALL_PROJECTIONS, None)
    assert sorted(names) == sorted(_llama_names())
    assert "lm_head" not in names
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    # named_modules order
    order = [n for n, _ in model.named_modules()]
    assert names == sorted(names, key=order.index)


def test_all_projections_llama_model_adapts_them():
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(target_modules=ALL_PROJECTIONS))
    assert sorted(model.adapted_names) == sorted(_llama_names())
    assert isinstance(model.model.lm_head, nn.Linear)
    assert all(isinstance(m, af.SVDLinear) for _, m in model.adapted_layers)


def test_all_projections_gpt2_picks_conv1d():
    model = tiny_gpt2()
    names = find_target_modules(model, ALL_PROJECTIONS, None)
    expected = [
        f"transformer.h.{i}.{n}"
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert sorted(names) == sorted(expected)
    assert "lm_head" not in names
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in names)


def test_gpt2_model_marks_fan_in_fan_out():
    model = af.get_adalora_model(tiny_gpt2(), af.AdaLoraConfig(target_modules=ALL_PROJECTIONS))
    for name, layer in model.adapted_layers:
        assert layer.fan_in_fan_out, name
        d_in, d_out = layer.base_layer.weight.shape
        assert layer.lora_A.shape == (12, d_in)
        assert layer.lora_B.shape == (d_out, 12)


def test_all_projections_bert_excludes_pooler():
    model = tiny_bert()
    names = find_target_modules(model, ALL_PROJECTIONS, None)
    assert "pooler.dense" not in names
    expected = [
        f"encoder.layer.{i}.{n}"
        for i in range(2)
        for n in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ]
    assert sorted(names) == sorted(expected)


def test_list_is_suffix_match():
    model = tiny_llama()
    assert find_target_modules(model, ["q_proj", "v_proj"], None) == _llama_names(projs=["q_proj", "v_proj"])
    # a full dotted suffix works, a partial component does not
    assert find_target_modules(model, ["self_attn.o_proj"], None) == _llama_names(projs=["o_proj"])
    with pytest.raises(ValueError, match="target_modules"):
        find_target_modules(model, ["proj"], None)
    with pytest.raises(ValueError, match="target_modules"):
        find_target_modules(model, ["_proj"], None)
    # an exact full name
    assert find_target_modules(model, ["model.layers.1.mlp.up_proj"], None) == ["model.layers.1.mlp.up_proj"]
    # an explicit list may name the head
    assert find_target_modules(model, ["lm_head"], None) == ["lm_head"]


def test_list_skips_containers_and_refuses_other_named_layers():
    model = tiny_llama()
    with pytest.raises(ValueError, match="target_modules"):  # containers are not targets: none matched
        find_target_modules(model, ["self_attn", "mlp"], None)
    # A named leaf AdaLoRA cannot adapt is refused, as PEFT refuses it (not silently skipped).
    with pytest.raises(ValueError, match="'model.embed_tokens': unsupported base layer Embedding"):
        find_target_modules(model, ["self_attn", "embed_tokens"], None)


def test_string_is_full_regex():
    model = tiny_llama()
    assert find_target_modules(model, r".*\.(q|k)_proj", None) == _llama_names(projs=["q_proj", "k_proj"])
    assert find_target_modules(model, r"model\.layers\.0\..*_proj", None) == _llama_names(1)
    # full match: a regex matching only a substring matches nothing
    with pytest.raises(ValueError, match="target_modules"):
        find_target_modules(model, "q_proj", None)
    with pytest.raises(ValueError, match="target_modules"):
        find_target_modules(model, r"model\.layers\.0", None)


def test_exclude_modules_list_and_regex():
    model = tiny_llama()
    names = find_target_modules(model, ALL_PROJECTIONS, ["k_proj", "down_proj"])
    assert sorted(names) == sorted(_llama_names(projs=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]))
    names = find_target_modules(model, ["q_proj", "v_proj"], r"model\.layers\.1\..*")
    assert names == _llama_names(1, projs=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="exclude_modules"):
        find_target_modules(model, ["q_proj"], ["q_proj"])


def test_exclude_via_config():
    cfg = af.AdaLoraConfig(
        target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]
    )
    model = af.get_adalora_model(tiny_llama(), cfg)
    assert model.adapted_names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def _peft_targets(model, **config) -> list[str]:
    """The modules PEFT's AdaLoRA adapts on a copy of ``model``."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(total_step=10, **config))
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_E"))


ARCHS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "deberta-v2": lambda: tiny_model("deberta-v2"),
    "t5": lambda: tiny_model("t5"),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"target_modules": "all-linear"},
        {"target_modules": "ALL-LINEAR", "task_type": "FEATURE_EXTRACTION"},
        {"target_modules": ["q_proj", "query", "query_proj", "c_attn", "q"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "query", "query_proj", "c_attn", "q"], "layers_to_transform": 0},
        {"target_modules": ["v_proj", "value", "value_proj", "c_attn", "v"], "layers_to_transform": [0, 1]},
    ],
    ids=["peft-default", "all-linear", "all-linear-upper", "layer-1", "layer-0-int", "layers-0-1"],
)
def test_targets_are_peft_s(arch, spec):
    model = ARCHS[arch]()
    expected = _peft_targets(model, **spec)
    ours = af.get_adalora_model(copy.deepcopy(model), af.AdaLoraConfig(total_step=10, **spec))
    assert sorted(ours.adapted_names) == expected
    # The config records the modules as PEFT's does, so both reload the same modules from the file.
    assert ours.adalora_config.target_modules is not None


def test_layers_pattern_names_the_layer_container():
    model = tiny_llama(num_layers=3)
    spec = {"target_modules": ["q_proj"], "layers_to_transform": [2], "layers_pattern": "layers"}
    assert _peft_targets(model, **spec) == ["model.layers.2.self_attn.q_proj"]
    assert find_target_modules(model, ["q_proj"], None, [2], "layers") == ["model.layers.2.self_attn.q_proj"]
    assert find_target_modules(model, ["q_proj"], None, [2], ["blocks", "layers"]) == [
        "model.layers.2.self_attn.q_proj"
    ]
    with pytest.raises(ValueError, match="layers_to_transform=\\[2\\]"):
        find_target_modules(model, ["q_proj"], None, [2], "blocks")


def test_no_peft_default_for_an_unknown_architecture_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default target modules for model_type None.*all-linear"):
        af.get_adalora_model(model, af.AdaLoraConfig())
    assert af.get_adalora_model(model, af.AdaLoraConfig(target_modules="all-linear")).adapted_names == ["0"]


def test_peft_default_is_recorded_in_the_config_and_the_checkpoint(tmp_path):
    model = af.get_adalora_model(tiny_llama(), af.AdaLoraConfig(total_step=10))
    assert sorted(model.adalora_config.target_modules) == ["q_proj", "v_proj"]
    model.save_pretrained(tmp_path)
    loaded = af.AdaLoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.adapted_names == model.adapted_names


def test_layer_replication_as_peft(tmp_path):
    """layer_replication=[(0, 2), (1, 2)]: three layers sharing the base weights of two, each with its
    own adapters, as PEFT builds them; same losses and masks as PEFT from PEFT's checkpoint, both ways."""
    peft = pytest.importorskip("peft")
    from tests.helpers import batches, peft_adalora, train_side_by_side

    spec = dict(
        layer_replication=[(0, 2), (1, 2)],
        init_r=4,
        target_r=2,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=8,
        task_type="CAUSAL_LM",
    )
    base = tiny_llama(num_layers=2)
    pm = peft_adalora(copy.deepcopy(base), ["q_proj", "v_proj"], **spec)
    ours = af.get_adalora_model(
        copy.deepcopy(base), af.AdaLoraConfig(target_modules=["q_proj", "v_proj"], **spec)
    )
    assert sorted(ours.adapted_names) == sorted(
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_E")
    )
    layers = ours.model.model.layers
    assert len(layers) == 3 and ours.model.config.num_hidden_layers == 3
    assert layers[2].self_attn.q_proj.base_layer.weight is layers[1].self_attn.q_proj.base_layer.weight
    assert layers[2].self_attn.q_proj.lora_A is not layers[1].self_attn.q_proj.lora_A
    pm.save_pretrained(tmp_path)
    fresh = copy.deepcopy(base)
    ours = af.AdaLoraModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours.train()
    theirs.train()
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_p = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    data = batches(spec["total_step"])
    assert train_side_by_side(theirs, ours, opt_p, opt_o, data, range(len(data))) > 0
    # a failed load leaves the model's own layer list
    other = copy.deepcopy(base)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if ".layers.2." not in k}, path)
    with pytest.raises(ValueError, match="no weights for module 'model.layers.2.self_attn"):
        af.AdaLoraModel.from_pretrained(other, tmp_path)
    assert len(other.model.layers) == 2 and other.config.num_hidden_layers == 2


def test_layer_replication_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"range \[1, 5\) is outside the 2 layers"):
        af.get_adalora_model(
            tiny_llama(), af.AdaLoraConfig(target_modules=["q_proj"], layer_replication=[(1, 5)])
        )
    with pytest.raises(ValueError, match="layer_replication must be a list"):
        af.AdaLoraConfig(layer_replication=[1, 2])
