"""checkpoint/reader.py: a checkpoint folder is read and checked before the model is touched. Missing
files, a LoRA checkpoint, other shapes and another architecture raise, naming the file or the module, and
leave the base model untouched."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adalora_fast as af
from adalora_fast.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME
from tests.helpers import (
    allocator_state,
    batches,
    checkpoint_model,
    is_untouched,
    tiny_gpt2,
    tiny_llama,
    train_loop,
    trainable_params,
)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        af.AdaLoraModel.from_pretrained(tiny_llama(), tmp_path)
    checkpoint_model(tiny_llama()).save_pretrained(tmp_path)
    os.unlink(tmp_path / WEIGHTS_NAME)
    base = tiny_llama()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        af.AdaLoraModel.from_pretrained(base, tmp_path)
    assert is_untouched(base)


def test_lora_checkpoint_is_rejected(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2))
    pm.save_pretrained(tmp_path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        af.AdaLoraModel.from_pretrained(base, tmp_path)
    assert is_untouched(base)


def test_checkpoint_for_other_shapes_names_the_module(tmp_path):
    checkpoint_model(tiny_llama()).save_pretrained(tmp_path)
    wider = tiny_llama(hidden=48, intermediate=64)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*lora_A has shape"):
        af.AdaLoraModel.from_pretrained(wider, tmp_path)
    assert is_untouched(wider)
    deeper = tiny_llama(num_layers=3)
    with pytest.raises(ValueError, match=r"no weights for module 'model\.layers\.2\."):
        af.AdaLoraModel.from_pretrained(deeper, tmp_path)
    assert is_untouched(deeper)


def test_checkpoint_for_other_architecture(tmp_path):
    model = af.get_adalora_model(tiny_gpt2(), af.AdaLoraConfig(init_r=2, target_r=1, total_step=5))
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="c_attn"):
        af.AdaLoraModel.from_pretrained(base, tmp_path)
    assert is_untouched(base)


# ---- corrupt and edited files: refused naming the file, nothing changed -------------------------------
def _truncate(name: str, size: int):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:size])


def _edit_state_meta(edit):
    def mutate(d):
        with safe_open(str(d / STATE_NAME), "pt") as f:
            meta = json.loads(f.metadata()["json"])
        tensors = load_file(str(d / STATE_NAME))
        edit(meta)
        save_file(tensors, str(d / STATE_NAME), metadata={"json": json.dumps(meta)})

    return mutate


def _retype_factor(kind: str, cast):
    def mutate(d):
        tensors = load_file(str(d / WEIGHTS_NAME))
        key = next(k for k in tensors if k.endswith(kind))
        tensors[key] = cast(tensors[key])
        save_file(tensors, str(d / WEIGHTS_NAME))

    return mutate


def _state_without_metadata(d):
    save_file(load_file(str(d / STATE_NAME)), str(d / STATE_NAME), metadata={"other": "tool"})


CORRUPT = {
    "truncated weights": (_truncate(WEIGHTS_NAME, 100), WEIGHTS_NAME, "not a readable safetensors file"),
    "garbage weights": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\0" * 64), WEIGHTS_NAME, "not a readable"),
    "truncated state": (_truncate(STATE_NAME, 200), STATE_NAME, "not a readable safetensors file"),
    "config not JSON": (lambda d: (d / CONFIG_NAME).write_text("{oops"), CONFIG_NAME, "not valid JSON"),
    "config a list": (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), CONFIG_NAME, "not a config"),
    "config bad field": (
        lambda d: (d / CONFIG_NAME).write_text(
            json.dumps({**json.loads((d / CONFIG_NAME).read_text()), "deltaT": 0})
        ),
        CONFIG_NAME,
        "deltaT must be an integer >= 1",
    ),
    "state without metadata": (_state_without_metadata, STATE_NAME, "no training-state metadata"),
    "state lacks budget": (_edit_state_meta(lambda m: m.pop("budget")), STATE_NAME, "lacks 'budget'"),
    "state budget a string": (
        _edit_state_meta(lambda m: m.update(budget="x")),
        STATE_NAME,
        "metadata 'budget' must be int",
    ),
    "state masked an int": (
        _edit_state_meta(lambda m: m.update(masked=1)),
        STATE_NAME,
        "metadata 'masked' must be bool",
    ),
    "int64 lora_A": (
        _retype_factor("lora_A", lambda t: t.to(torch.int64)),
        WEIGHTS_NAME,
        "has dtype torch.int64",
    ),
    "bool lora_E": (_retype_factor("lora_E", lambda t: t > 0), WEIGHTS_NAME, "has dtype torch.bool"),
}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ok")
    model = checkpoint_model(tiny_llama())
    train_loop(model, torch.optim.AdamW(trainable_params(model), lr=1e-2), range(8), batches(8))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.parametrize("trainable", [True, False])
def test_corrupt_files_are_refused_naming_the_file(trained_checkpoint, tmp_path, case, trainable):
    mutate, name, message = CORRUPT[case]
    if not trainable and name == STATE_NAME:
        pytest.skip("an inference load does not read the training state")
    folder = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, folder)
    mutate(folder)
    base = tiny_llama()
    with pytest.raises(ValueError, match=message) as err:
        af.AdaLoraModel.from_pretrained(base, folder, is_trainable=trainable)
    assert str(folder / name) in str(err.value)
    assert is_untouched(base)


@pytest.mark.parametrize("case", sorted(c for c in CORRUPT if not c.startswith("config")))
def test_corrupt_files_are_refused_by_the_in_place_loads_changing_nothing(trained_checkpoint, tmp_path, case):
    mutate, name, message = CORRUPT[case]
    folder = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, folder)
    mutate(folder)
    model = af.AdaLoraModel.from_pretrained(tiny_llama(), trained_checkpoint, is_trainable=True)
    before = allocator_state(model)
    loads = [lambda: model.load_adapter(folder)]
    if name == STATE_NAME:
        loads.append(lambda: model.load_training_state(folder))
    for load in loads:
        with pytest.raises(ValueError, match=message):
            load()
        after = allocator_state(model)
        assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("layers", [1, 3])
def test_a_checkpoint_of_other_modules_is_refused(trained_checkpoint, layers):
    base = tiny_llama(layers)
    with pytest.raises(
        ValueError, match=f"{WEIGHTS_NAME}: (no weights for module|module .* is not an adapted)"
    ):
        af.AdaLoraModel.from_pretrained(base, trained_checkpoint)
    assert is_untouched(base)


def test_saving_a_model_without_adapters_is_refused(trained_checkpoint, tmp_path):
    model = af.AdaLoraModel.from_pretrained(tiny_llama(), trained_checkpoint)
    model.merge_and_unload()
    with pytest.raises(RuntimeError, match="no adapters any more"):
        model.save_pretrained(trained_checkpoint)
    assert af.AdaLoraModel.from_pretrained(tiny_llama(), trained_checkpoint).adapted_names
