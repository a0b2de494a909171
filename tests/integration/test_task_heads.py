"""Sequence classification, the AdaLoRA paper's main setting: the task head PEFT trains and saves
(``modules_to_save``) trains with the adapters, saves under PEFT's keys, reloads with equal logits,
and PEFT's SEQ_CLS checkpoints load both ways; training matches PEFT's losses step by step."""

from __future__ import annotations

import copy

import pytest
import torch

import adalora_fast as af
from adalora_fast.saved_modules import ModulesToSaveWrapper
from tests.helpers import tiny_model, train_side_by_side

peft = pytest.importorskip("peft")

ARCHS = {"bert": ("bert-cls", "classifier"), "deberta-v2": ("deberta-v2", "classifier")}
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8)


def _batch(seed: int, n: int = 4, seq: int = 7, labels: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, seq), generator=g), torch.randint(0, labels, (n,), generator=g)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _num_labels(base) -> int:
    return base.config.num_labels


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_head_trains_saves_and_reloads_with_equal_logits(tmp_path, arch):
    name, head = ARCHS[arch]
    base = tiny_model(name, seed=0)
    cfg = af.AdaLoraConfig(
        task_type="SEQ_CLS", target_modules="all-projections", lora_dropout=0.0, **SCHEDULE
    )
    model = af.get_adalora_model(copy.deepcopy(base), cfg)
    assert model.adalora_config.modules_to_save == ["classifier", "score"]
    assert model.saved_module_names == [head]
    wrapper = model.model.get_submodule(head)
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert head not in model.adapted_names and not any(n.startswith(head + ".") for n in model.adapted_names)
    before = {k: v.clone() for k, v in wrapper.modules_to_save["default"].state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p is wrapper.modules_to_save["default"].weight for p in trainable)
    assert not wrapper.original_module.weight.requires_grad
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for step in range(SCHEDULE["total_step"]):
        x, y = _batch(step, labels=_num_labels(base))
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    after = wrapper.modules_to_save["default"].state_dict()
    assert not torch.equal(after["weight"], before["weight"]), "the head must train"
    torch.testing.assert_close(
        wrapper.original_module.weight, base.get_submodule(head).weight, rtol=0, atol=0
    )
    model.save_pretrained(tmp_path)
    model.eval()
    x, _ = _batch(99)
    for trainable_again in (False, True):
        loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=trainable_again)
        loaded.eval()
        torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=1e-6, atol=1e-6)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(in_peft, x), _logits(model, x), rtol=1e-5, atol=1e-6)
    # merge_and_unload keeps the trained head (PEFT's unload puts the copy in place)
    expected = _logits(model, x)
    plain = model.merge_and_unload()
    assert type(plain.get_submodule(head)) is type(base.get_submodule(head))
    torch.testing.assert_close(_logits(plain, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_seq_cls_checkpoint_loads_and_trains_like_peft(tmp_path, arch):
    name, head = ARCHS[arch]
    base = tiny_model(name, seed=0)
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.AdaLoraConfig(task_type="SEQ_CLS", target_modules=["query", "value", "query_proj", "value_proj"],
                           lora_alpha=8, **SCHEDULE),
    )  # fmt: skip
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
            if "modules_to_save" in n:
                p.add_(0.1)  # a head that differs from the base's
    pm.save_pretrained(tmp_path)
    x, _ = _batch(5)
    pm.eval()
    ours = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(ours, x), _logits(pm, x), rtol=1e-5, atol=1e-6)

    # from the same checkpoint, PEFT's training and ours give the same losses step by step
    ours = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours.train()
    theirs.train()
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_p = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    assert len(opt_o.param_groups[0]["params"]) == len(opt_p.param_groups[0]["params"])
    data = []
    for step in range(SCHEDULE["total_step"]):
        x, y = _batch(step, labels=_num_labels(base))
        data.append({"input_ids": x, "labels": y})
    train_side_by_side(theirs, ours, opt_p, opt_o, data, range(len(data)), seed_dropout=True)


def test_a_module_to_save_missing_from_the_checkpoint_is_a_clear_error(tmp_path):
    base = tiny_model("bert-cls", seed=0)
    cfg = af.AdaLoraConfig(target_modules=["query"], modules_to_save=["classifier"], total_step=8)
    af.get_adalora_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter_model.safetensors"
    weights = {k: v for k, v in load_file(path).items() if not k.endswith("classifier.bias")}
    save_file(weights, path)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="module to save 'classifier' does not match the model.*'bias'"):
        af.AdaLoraModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, (af.SVDLinear, ModulesToSaveWrapper)) for m in fresh.modules())


def test_token_classification_and_qa_heads_are_the_ones_peft_saves():
    for task, heads in (("TOKEN_CLS", ["classifier", "score"]), ("QUESTION_ANS", ["qa_outputs"])):
        cfg = af.AdaLoraConfig(task_type=task, target_modules=["query"], total_step=8)
        assert af.get_adalora_model(tiny_model("bert-cls"), cfg).adalora_config.modules_to_save == heads


def test_lora_export_carries_the_head(tmp_path):
    base = tiny_model("bert-cls", seed=0)
    cfg = af.AdaLoraConfig(
        task_type="SEQ_CLS", target_modules=["query", "value"], init_lora_weights=False, total_step=8
    )
    model = af.get_adalora_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    model.export_lora(tmp_path)
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x, _ = _batch(3)
    model.eval()
    torch.testing.assert_close(_logits(lora, x), _logits(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_as_peft(tmp_path, bias):
    """bias="all" / "lora_only": the same biases train as in PEFT (counts, losses step by step), are
    saved under PEFT's keys and load both ways with equal logits."""
    base = tiny_model("bert-cls", seed=0)
    spec = dict(task_type="SEQ_CLS", target_modules=["query", "value"], bias=bias, **SCHEDULE)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**spec))
    ours = af.get_adalora_model(copy.deepcopy(base), af.AdaLoraConfig(**spec))
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()

    def biases(named, prefix):  # the trained base biases (heads and adapters are compared elsewhere)
        keep = ("bias", "modules_to")
        return {
            n.removeprefix(prefix) for n, p in named if p.requires_grad and keep[0] in n and keep[1] not in n
        }

    assert biases(ours.named_parameters(), "model.") == biases(pm.named_parameters(), "base_model.model.")
    assert biases(ours.named_parameters(), "model."), "some biases must train"
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
            elif p.requires_grad and "bias" in n:
                p.add_(0.05)
    pm.save_pretrained(tmp_path)
    ours = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    x, _ = _batch(4)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), rtol=1e-5, atol=1e-6)
    ours.train()
    theirs.train()
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_p = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    data = [dict(zip(("input_ids", "labels"), _batch(s, labels=3), strict=True)) for s in range(5)]
    train_side_by_side(theirs, ours, opt_p, opt_o, data, range(len(data)), seed_dropout=True)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ours.eval()
    torch.testing.assert_close(_logits(back, x), _logits(ours, x), rtol=1e-5, atol=1e-6)
    # a bias missing from the file is a clear error, before the model is touched
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ours" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("query.base_layer.bias")}, path)
    with pytest.raises(ValueError, match="bias 'bert.encoder.layer.0.attention.self.query.base_layer.bias'"):
        af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
