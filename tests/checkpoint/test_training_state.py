"""checkpoint/training_state.py: our training state next to PEFT's files. Resuming is bit-identical; a
stale state (weights rewritten by another tool) is never used; a corrupt one names the module and touches
nothing; the non-finite step counter survives save and load (and a state without it loads as 0)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adalora_fast as af
from adalora_fast.checkpoint import NONFINITE_KEY, STATE_NAME, WEIGHTS_NAME
from tests.helpers import (
    CHECKPOINT_SCHEDULE,
    batches,
    checkpoint_model,
    draw_grads,
    is_untouched,
    poisoned,
    scored_model,
    set_grads,
    tiny_llama,
    train_loop,
    trainable_params,
)


def test_resume_is_bit_identical(tmp_path):
    data = batches(30)
    base = tiny_llama(seed=0)
    torch.manual_seed(5)
    ref = checkpoint_model(copy.deepcopy(base), lora_dropout=0.0)
    resumed_init = copy.deepcopy(ref)
    opt = torch.optim.AdamW(trainable_params(ref), lr=1e-2)
    train_loop(ref, opt, range(30), data)

    first = resumed_init
    opt1 = torch.optim.AdamW(trainable_params(first), lr=1e-2)
    train_loop(first, opt1, range(15), data)
    first.save_pretrained(tmp_path / "ckpt")
    torch.save(opt1.state_dict(), tmp_path / "opt.pt")

    second = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "ckpt", is_trainable=True)
    opt2 = torch.optim.AdamW(trainable_params(second), lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    train_loop(second, opt2, range(15, 30), data)

    assert second.rank_pattern == ref.rank_pattern
    for (name, a), (_, b) in zip(ref.adapted_layers, second.adapted_layers, strict=True):
        assert a.lora_A.shape == b.lora_A.shape == (CHECKPOINT_SCHEDULE["init_r"], a.in_features)
        for k in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(a, k), getattr(b, k)), f"{name}.{k}"


def test_stale_training_state_is_never_used(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama(seed=0)
    model = checkpoint_model(copy.deepcopy(base))
    model.save_pretrained(tmp_path)
    # Another tool rewrites the adapter weights: the old training state no longer belongs to them.
    weights = load_file(str(tmp_path / WEIGHTS_NAME))
    weights = {k: (torch.full_like(v, 0.5) if k.endswith("lora_E") else v) for k, v in weights.items()}
    save_file(weights, str(tmp_path / WEIGHTS_NAME))
    with pytest.warns(UserWarning, match="ignoring the training state"):
        loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    for _, layer in loaded.adapted_layers:
        assert torch.all(layer.lora_E == 0.5)
    # Saving an inference model into the directory removes the training state it cannot vouch for.
    af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path).save_pretrained(tmp_path)
    assert not (tmp_path / STATE_NAME).exists()


def test_corrupt_training_state_names_module_and_touches_nothing(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = checkpoint_model(tiny_llama())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / STATE_NAME), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(tmp_path / STATE_NAME))
    name = model.adapted_names[3]
    state[f"keep.{name}"] = torch.ones(CHECKPOINT_SCHEDULE["init_r"] + 2, dtype=torch.uint8)
    save_file(state, str(tmp_path / STATE_NAME), metadata=metadata)
    base = tiny_llama()
    with pytest.raises(ValueError, match=f"keep mask of module '{name}'"):
        af.AdaLoraModel.from_pretrained(base, tmp_path, is_trainable=True)
    assert is_untouched(base)


def test_counter_survives_save_and_load(tmp_path):
    model = scored_model("torch")
    gen = torch.Generator().manual_seed(6)
    for step in range(5):
        grads = draw_grads(model, gen)
        if step in (1, 3):
            grads = poisoned(model, grads, "lora_B", float("inf"))
        set_grads(model, grads)
        model.update_and_allocate(step)
    model.save_pretrained(tmp_path)
    base = tiny_llama(2, seed=0)
    loaded = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert loaded.nonfinite_score_steps() == 2

    # A training-state file written before the counter existed still loads (counter 0).
    with safe_open(str(tmp_path / STATE_NAME), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(tmp_path / STATE_NAME))
    del state[NONFINITE_KEY]
    save_file(state, str(tmp_path / STATE_NAME), metadata=metadata)
    old = af.AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert old.nonfinite_score_steps() == 0
    assert old.rank_allocator.last_step == 4
