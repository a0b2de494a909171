"""checkpoint/reader.py: a checkpoint folder is read and checked before the model is touched. Missing
files, a LoRA checkpoint, other shapes and another architecture raise, naming the file or the module, and
leave the base model untouched."""

from __future__ import annotations

import os

import pytest

import adalora_fast as af
from adalora_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers import checkpoint_model, is_untouched, tiny_gpt2, tiny_llama


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
