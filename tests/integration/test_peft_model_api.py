"""The PeftModel surface: a PEFT AdaLoRA script runs with ``peft`` swapped for ``adalora_fast``.

Each behaviour is checked side by side with PEFT 0.21 on the same tiny model, with our adapters holding
PEFT's A, E, B (non-zero E), where PEFT has the behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adalora_fast as af
from adalora_fast.factors import FACTORS
from adalora_fast.layer import SVDLinear
from adalora_fast.peft_api import UNSUPPORTED
from tests.helpers import (
    batches,
    is_untouched,
    peft_adalora,
    peft_pattern,
    tiny_gpt2,
    tiny_llama,
    tiny_model,
    train_side_by_side,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=20)
X = batches(1)[0]


def _config(targets=TARGETS, **cfg):
    return peft.AdaLoraConfig(
        target_modules=targets, task_type="CAUSAL_LM", orth_reg_weight=0.5, **{**SCHEDULE, **cfg}
    )


def _pair(make=tiny_llama, targets=TARGETS, **cfg):
    """PEFT's model and ours (``af.get_peft_model`` on an identical base, from an equal PEFT config),
    ours holding PEFT's A, E, B."""
    pm = peft_adalora(make(), targets, task_type="CAUSAL_LM", orth_reg_weight=0.5, **{**SCHEDULE, **cfg})
    ours = af.get_peft_model(make(), _config(targets, **cfg))
    theirs = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in ours.adapted_layers:
            for k in FACTORS:
                getattr(layer, k).copy_(getattr(theirs[name], k)["default"])
    return pm, ours


def _logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def _lora_layers(pm):
    return [m for m in pm.base_model.model.modules() if hasattr(m, "lora_E")]


# ---- construction ---------------------------------------------------------------------------------------
def test_constructor_takes_peft_tuner_signature():
    tuner = peft.tuners.AdaLoraModel(tiny_llama(), {"mine": _config()}, "mine")
    ours = af.AdaLoraModel(tiny_llama(), {"mine": _config()}, "mine")  # PEFT's positional form
    assert ours.adapter_name == ours.active_adapter == "mine"  # a str, as PeftModel's (the tuner's is a list)
    assert ours.active_adapters == tuner.active_adapters == ["mine"]
    assert list(ours.peft_config) == list(tuner.peft_config) == ["mine"]
    assert ours.targeted_module_names == tuner.targeted_module_names
    plain = af.AdaLoraModel(tiny_llama(), _config(), "default", False)
    assert plain.is_trainable and plain.rank_allocator is not None
    assert isinstance(plain.adalora_config, af.AdaLoraConfig)  # a peft.AdaLoraConfig is coerced


def test_inference_mode_decides_is_trainable_unless_given():
    frozen = af.AdaLoraModel(tiny_llama(), _config(inference_mode=True))
    pm = peft.get_peft_model(tiny_llama(), _config(inference_mode=True))
    assert not frozen.is_trainable and frozen.rank_allocator is None
    assert frozen.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert frozen.get_nb_trainable_parameters()[0] == 0
    forced = af.AdaLoraModel(tiny_llama(), _config(inference_mode=True), is_trainable=True)
    assert forced.is_trainable and forced.rank_allocator is not None


def test_low_cpu_mem_usage_makes_no_difference():
    torch.manual_seed(3)
    a = af.AdaLoraModel(tiny_llama(), _config(), "default", True)
    torch.manual_seed(3)
    b = af.AdaLoraModel(tiny_llama(), _config(), "default", False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(p.device.type == "cpu" for p in a.parameters())


def test_get_peft_model_matches_peft():
    base = tiny_llama()
    pm = peft.get_peft_model(tiny_llama(), _config(), revision="v1")
    ours = af.get_peft_model(base, _config(), revision="v1")
    assert type(ours) is af.AdaLoraModel
    assert ours.base_model is ours and ours.base_model.model is base and ours.get_base_model() is base
    assert type(pm.base_model.model) is type(ours.base_model.model)
    assert ours.targeted_module_names == pm.base_model.targeted_module_names
    cfg, theirs = ours.peft_config["default"], pm.peft_config["default"]
    assert (cfg.revision, cfg.base_model_name_or_path) == (theirs.revision, theirs.base_model_name_or_path)
    assert ours.peft_type == pm.peft_type
    assert ours.base_model_torch_dtype == pm.base_model_torch_dtype
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_get_peft_model_refuses_mixed_and_other_methods():
    base = tiny_llama()
    with pytest.raises(ValueError, match="mixed=True"):
        af.get_peft_model(base, _config(), mixed=True)
    with pytest.raises(TypeError, match="LoraConfig .*not an AdaLoRA config"):
        af.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"]))
    assert is_untouched(base)


def test_gradient_checkpointing_is_prepared_as_peft():
    # PeftModel.__init__ makes the frozen input embeddings' output require grad when the base model
    # checkpoints activations (reentrant checkpointing would otherwise give the adapters no gradient).
    for checkpointing in (True, False):
        bases = [tiny_llama(), tiny_llama()]
        if checkpointing:
            for b in bases:
                b.gradient_checkpointing_enable()
        pm, ours = peft.get_peft_model(bases[0], _config()), af.get_peft_model(bases[1], _config())
        needs = [m.get_input_embeddings()(X).requires_grad for m in (pm, ours)]
        assert needs == [checkpointing, checkpointing]


# ---- the documented training loop ---------------------------------------------------------------------
def test_peft_documented_loop_runs_unchanged():
    pm, ours = _pair()
    data = batches(SCHEDULE["total_step"] + 2)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, ours)]
    masked = 0
    for step, x in enumerate(data):
        losses = []
        for model, opt in zip((pm, ours), opts, strict=True):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)  # PEFT's documented call
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0, msg=f"step {step}")
        if peft_pattern(pm) is not None:
            masked += 1
            assert ours.rank_pattern == peft_pattern(pm), f"rank pattern differs at step {step}"
    assert masked > 0
    # PEFT keeps the config's rank_pattern current (keys: parameter names without the adapter name).
    theirs = {k.removesuffix(".default"): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == theirs


# ---- rank_pattern given at creation ---------------------------------------------------------------------
def _start_pattern(model) -> dict[str, list[bool]]:
    """A fixed pattern over every adapted module (PEFT's config keys), 2 or 3 of 4 ranks kept."""
    return {f"{n}.lora_E": [(i + j) % 3 != 0 for j in range(4)] for i, n in enumerate(model.adapted_names)}


def _pair_with_start_pattern():
    probe = af.get_peft_model(tiny_llama(), _config())
    pm, ours = _pair(rank_pattern=_start_pattern(probe))
    return pm, ours, {k.removesuffix(".lora_E"): v for k, v in _start_pattern(probe).items()}


def _opts(pm, ours):
    return [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (pm, ours)]


def test_rank_pattern_at_creation_is_saved_as_peft_saves_it(tmp_path):
    from safetensors.torch import load_file

    pm, ours, pattern = _pair_with_start_pattern()
    assert ours.rank_pattern == pattern == peft_pattern(pm)  # recorded, nothing masked yet
    assert all(bool((layer.lora_E != 0).all()) for _, layer in ours.adapted_layers)
    pm.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key, t in theirs.items():  # PEFT truncates the saved factors to the pattern: so do we
        torch.testing.assert_close(mine[key], t, rtol=0, atol=0, msg=key)
    assert mine["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 2
    loaded = af.AdaLoraModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert loaded.kept_ranks() == {n: sum(p) for n, p in pattern.items()}


def test_rank_pattern_at_creation_masks_steps_past_the_final_one_as_peft():
    pm, ours, pattern = _pair_with_start_pattern()
    opt_p, opt_o = _opts(pm, ours)
    final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    steps = range(final + 1, SCHEDULE["total_step"] + 2)  # a run resumed past the final step
    assert train_side_by_side(pm, ours, opt_p, opt_o, batches(steps.stop), steps) == len(steps)
    assert ours.rank_pattern == pattern
    for name, layer in ours.adapted_layers:
        masked = ~torch.tensor(pattern[name])
        assert bool((layer.lora_E[masked] == 0).all()) and bool((layer.lora_E[~masked] != 0).all())


def test_rank_pattern_at_creation_is_replaced_by_the_first_mask_step_as_peft():
    pm, ours, pattern = _pair_with_start_pattern()
    opt_p, opt_o = _opts(pm, ours)
    steps = range(SCHEDULE["tinit"] + 4)
    train_side_by_side(pm, ours, opt_p, opt_o, batches(steps.stop), steps)  # patterns equal at every step
    assert ours.rank_pattern != pattern


def test_rank_pattern_at_creation_is_checked_before_anything_changes():
    base = tiny_llama()
    layers = base.model.layers
    with pytest.raises(ValueError, match=r"rank_pattern names 'model.layers.0.mlp.up_proj.lora_E'"):
        af.get_peft_model(
            base,
            _config(
                rank_pattern={"model.layers.0.mlp.up_proj.lora_E": [True] * 4},
                layer_replication=[(0, 2), (1, 2)],
            ),
        )
    assert base.model.layers is layers and len(layers) == 2 and base.config.num_hidden_layers == 2
    assert is_untouched(base)
    bad = {"model.layers.0.self_attn.q_proj.lora_E": [True] * 3}
    with pytest.raises(ValueError, match=r"rank_pattern of 'model.layers.0.self_attn.q_proj' has 3 entries"):
        af.get_peft_model(tiny_llama(), _config(rank_pattern=bad))
    with pytest.raises(ValueError, match="does not name a lora_E"):
        af.get_peft_model(tiny_llama(), _config(rank_pattern={"model.layers.0.self_attn.q_proj": [True] * 4}))


def test_rank_pattern_at_creation_of_an_inference_model_warns_and_is_dropped():
    probe = af.get_peft_model(tiny_llama(), _config())
    with pytest.warns(UserWarning, match="rank_pattern given at creation of a model for inference"):
        model = af.get_peft_model(
            tiny_llama(), _config(rank_pattern=_start_pattern(probe), inference_mode=True)
        )
    assert model.adalora_config.rank_pattern is None
    assert all(all(p) for p in model.rank_pattern.values())


# ---- parameter counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, inference", [("llama", False), ("llama", True), ("gpt2", False)])
def test_trainable_parameter_counts_and_print_match_peft(capsys, arch, inference):
    make, targets = (tiny_llama, TARGETS) if arch == "llama" else (tiny_gpt2, GPT2_TARGETS)
    extra = dict(inference_mode=inference, fan_in_fan_out=arch == "gpt2")
    pm = peft.get_peft_model(make(), _config(targets, **extra))
    ours = af.get_peft_model(make(), _config(targets, **extra))
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == theirs
    assert theirs.startswith("trainable params: ")


# ---- disabling the adapters -----------------------------------------------------------------------------
def test_disable_adapter_gives_the_frozen_base_outputs_as_peft():
    pm, ours = _pair()
    base = _logits(tiny_llama())
    adapted = _logits(ours)
    torch.testing.assert_close(adapted, _logits(pm))
    assert not torch.allclose(adapted, base)
    with ours.disable_adapter(), pm.disable_adapter():
        assert torch.equal(_logits(ours), base)
        torch.testing.assert_close(_logits(pm), base)
        assert ours.has_active_enabled_adapter is pm.has_active_enabled_adapter is False
    assert ours.has_active_enabled_adapter is pm.has_active_enabled_adapter is True
    assert torch.equal(_logits(ours), adapted)


def test_disable_adapter_keeps_the_regulariser_as_peft():
    # PEFT's AdaLoraModel.forward adds orth_reg_weight * R to any returned loss, adapters disabled or not.
    pm, ours = _pair()
    base_loss = tiny_llama()(input_ids=X, labels=X).loss
    reg = 0.5 * ours.orth_regularization().detach()
    with ours.disable_adapter(), pm.disable_adapter(), torch.no_grad():
        loss_o, loss_p = (m(input_ids=X, labels=X).loss for m in (ours, pm))
    torch.testing.assert_close(loss_o, loss_p, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_o, base_loss.detach() + reg, rtol=1e-6, atol=0)
    assert reg > 1e-3


def test_disable_adapter_restores_the_state_on_exception():
    pm, ours = _pair()
    adapted = _logits(ours)
    for model in (ours, pm):
        with pytest.raises(RuntimeError, match="inside"):
            with model.disable_adapter():
                assert model.get_nb_trainable_parameters()[0] == 0  # PEFT freezes the adapters inside
                raise RuntimeError("inside")
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0
    assert not any(m.disable_adapters for _, m in ours.adapted_layers)
    assert torch.equal(_logits(ours), adapted)
    torch.testing.assert_close(_logits(pm), adapted)


def test_disable_adapter_leaves_disabled_layers_disabled_as_peft():
    pm, ours = _pair()
    base = _logits(tiny_llama())
    ours.disable_adapter_layers()
    pm.base_model.disable_adapter_layers()
    with ours.disable_adapter(), pm.disable_adapter():
        pass
    assert pm.get_model_status().enabled is False
    assert all(m.disable_adapters for _, m in ours.adapted_layers)
    assert torch.equal(_logits(ours), base)


def test_disable_adapter_keeps_an_inference_model_frozen():
    # PEFT makes the adapters trainable on exit, also for an inference-mode model; ours restores.
    ours = af.get_peft_model(tiny_llama(), _config(inference_mode=True))
    with ours.disable_adapter():
        pass
    assert ours.get_nb_trainable_parameters()[0] == 0


def test_enable_and_disable_adapter_layers_as_peft():
    pm, ours = _pair()
    base, adapted = _logits(tiny_llama()), _logits(ours)
    ours.base_model.disable_adapter_layers()
    pm.base_model.disable_adapter_layers()
    assert torch.equal(_logits(ours), base)
    torch.testing.assert_close(_logits(pm), base)
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 0
    ours.base_model.enable_adapter_layers()
    pm.base_model.enable_adapter_layers()
    assert torch.equal(_logits(ours), adapted)
    torch.testing.assert_close(_logits(pm), adapted)
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_a_disabled_merged_layer_unmerges_as_peft():
    pm, ours = _pair()
    base, adapted = _logits(tiny_llama()), _logits(ours)
    ours.merge_adapter()
    pm.merge_adapter()
    assert ours.merged and all(m.merged for m in _lora_layers(pm))
    with ours.disable_adapter(), pm.disable_adapter():
        assert torch.equal(_logits(ours), base)  # the original weights are back bitwise
        torch.testing.assert_close(_logits(pm), base)
    assert not any(m.merged for _, m in ours.adapted_layers)
    assert not any(m.merged for m in _lora_layers(pm))  # they stay unmerged after the context
    assert torch.equal(_logits(ours), adapted)


# ---- merging --------------------------------------------------------------------------------------------
def test_merge_adapter_and_unmerge_adapter_as_peft():
    pm, ours = _pair()
    weights = {n: p.clone() for n, p in ours.model.named_parameters()}
    adapted = _logits(ours)
    ours.merge_adapter()
    pm.merge_adapter()
    assert ours.merged and all(m.merged for m in _lora_layers(pm))
    torch.testing.assert_close(_logits(ours), _logits(pm))
    torch.testing.assert_close(_logits(ours), adapted)
    ours.unmerge_adapter()
    pm.unmerge_adapter()
    assert not any(m.merged for _, m in ours.adapted_layers) and not any(m.merged for m in _lora_layers(pm))
    assert all(torch.equal(p, weights[n]) for n, p in ours.model.named_parameters())


def test_merge_and_unload_matches_peft(capsys):
    pm, ours = _pair()
    adapted = _logits(ours)
    theirs = pm.merge_and_unload(progressbar=True)
    assert "Unloading and merging model" in capsys.readouterr().err
    merged = ours.merge_and_unload(progressbar=True, adapter_names=["default"])
    assert "Unloading and merging model" in capsys.readouterr().err
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    theirs_params = dict(theirs.named_parameters())
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, theirs_params[name], msg=name)
    torch.testing.assert_close(_logits(merged), _logits(theirs))
    torch.testing.assert_close(_logits(merged), adapted)
    assert ours.adapted_names == [] and ours.rank_allocator is None


def test_merge_and_unload_takes_only_our_adapter_name():
    _, ours = _pair()
    with pytest.raises(ValueError, match="Adapter other not found"):
        ours.merge_and_unload(adapter_names=["other"])
    assert not ours.merged and all(isinstance(m, SVDLinear) for _, m in ours.adapted_layers)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing():
    pm, ours = _pair()
    broken = ours.adapted_names[1]  # PEFT merges the layer before it first; ours changes nothing
    with torch.no_grad():
        ours.model.get_submodule(broken).lora_E[0] = float("inf")
        pm.base_model.model.get_submodule(broken).lora_E["default"][0] = float("inf")
    weights = {n: p.clone() for n, p in ours.model.named_parameters()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        pm.merge_and_unload(safe_merge=True)
    for call in (lambda: ours.merge_and_unload(safe_merge=True), lambda: ours.merge_adapter(safe_merge=True)):
        with pytest.raises(ValueError, match=f"NaNs detected in the merged weights of '{broken}'"):
            call()
        assert all(isinstance(ours.model.get_submodule(n), SVDLinear) for n in ours.adapted_names)
        assert not any(m.merged for _, m in ours.adapted_layers)
        assert all(torch.equal(p, weights[n]) for n, p in ours.model.named_parameters())


def test_unload_gives_the_original_base_model():
    pm, ours = _pair()
    reference = tiny_llama()
    ours.merge_adapter()  # PEFT's unload() would keep merged weights; ours unmerges first
    plain = ours.unload()
    theirs = pm.unload()
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    ref = reference.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in plain.state_dict().items())
    assert torch.equal(_logits(plain), _logits(reference))


# ---- adapter names, configs, PEFT names ------------------------------------------------------------------
def test_adapter_names_and_configs_as_peft():
    pm, ours = _pair()
    assert list(ours.peft_config) == list(pm.peft_config) == ["default"]
    assert ours.active_peft_config is ours.peft_config["default"] is ours.adalora_config
    assert ours.active_adapter == pm.active_adapter
    assert ours.active_adapters == pm.active_adapters == ours.base_model.active_adapters
    assert ours.trainable_adapter_name == pm.base_model.trainable_adapter_name
    assert ours.modules_to_save is pm.modules_to_save is None
    before = ours.get_nb_trainable_parameters()
    ours.set_adapter("default")
    pm.set_adapter("default")
    assert ours.get_nb_trainable_parameters() == before == pm.get_nb_trainable_parameters()
    for model in (ours, pm):
        with pytest.raises(ValueError, match="Adapter other not found"):
            model.set_adapter("other")
    with pytest.raises(ValueError, match=r"available adapters: \['default'\]"):
        ours.set_adapter("other")


def test_set_adapter_inference_mode_and_set_requires_grad_as_peft():
    pm, ours = _pair()
    full = ours.get_nb_trainable_parameters()
    steps = [
        lambda m: m.set_adapter("default", inference_mode=True),
        lambda m: m.set_requires_grad("default", True),
        lambda m: m.set_requires_grad(["default"], False),
        lambda m: m.set_requires_grad("other", True),  # other names are ignored
        lambda m: m.set_adapter("default"),
    ]
    for step in steps:
        step(ours)
        step(pm)
        assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters() == full


def test_modules_to_save_as_peft_for_sequence_classification():
    cfg = dict(task_type="SEQ_CLS", total_step=10, init_r=4, target_r=2)
    pm = peft.get_peft_model(tiny_model("deberta-v2"), peft.AdaLoraConfig(**cfg))
    ours = af.get_peft_model(tiny_model("deberta-v2"), peft.AdaLoraConfig(**cfg))
    assert ours.modules_to_save == pm.modules_to_save and ours.modules_to_save


def test_add_weighted_adapter_refused_as_peft():
    pm, ours = _pair()
    errors = []
    for model in (pm.base_model, ours):
        with pytest.raises(TypeError) as info:
            model.add_weighted_adapter(["default"], [1.0], "mixed")
        errors.append(str(info.value))
    assert errors[0] == errors[1] == "AdaLoraModel does not support add_weighted_adapter method."


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_peft_names_raise_attribute_error_naming_adalora_model(name):
    ours = af.get_peft_model(tiny_llama(), _config())
    with pytest.raises(AttributeError, match=rf"AdaLoraModel does not support PEFT's '{name}': \w"):
        getattr(ours, name)
    assert not hasattr(ours, name)  # not transformers' adapter mixin of the wrapped model


def _peft_public_names(pm) -> set[str]:
    from peft.tuners.adalora import AdaLoraModel as PeftTuner
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTuner
    from transformers.integrations.peft import PeftAdapterMixin
    from transformers.utils import PushToHubMixin

    classes = (peft.PeftModel, peft.PeftModelForCausalLM, BaseTuner, LoraModel, PeftTuner, PeftAdapterMixin,
               PushToHubMixin)  # fmt: skip
    names = {n for c in classes for n in vars(c)} | set(vars(pm)) | set(vars(pm.base_model))
    return {n for n in names if not n.startswith("_")} - set(dir(nn.Module)) - {"training"}


def test_every_peft_name_is_ours_or_listed_unsupported():
    pm = peft.get_peft_model(tiny_llama(), _config())
    ours = af.get_peft_model(tiny_llama(), _config())
    names = _peft_public_names(pm)
    assert set(UNSUPPORTED) <= names, "UNSUPPORTED lists names PEFT does not have"
    supported = names - set(UNSUPPORTED)
    assert all(hasattr(ours, n) for n in supported), sorted(n for n in supported if not hasattr(ours, n))
    # Of PEFT's names, only the generation methods reach the wrapped transformers model.
    ours_own = {n for n in supported if hasattr(type(ours), n) or n in vars(ours) or n in ours._modules}
    assert supported - ours_own == {"generate", "prepare_inputs_for_generation"}


def test_other_names_still_reach_the_wrapped_model():
    pm, ours = _pair()
    assert ours.config is ours.model.config
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids=X, **kwargs), pm.generate(input_ids=X, **kwargs))
