"""export_lora: ours -> a PEFT LoRA adapter -> peft.PeftModel.from_pretrained, with equal outputs, after
training with pruning (one module at rank 0), on Llama- and GPT-2-style (Conv1D) models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adalora_fast.testing import max_rel_err
from tests.helpers import LLAMA_PROJ, batches, tiny_gpt2, tiny_llama, trained_model

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_exported_lora_loads_in_peft_with_equal_outputs(which, tmp_path):
    base = tiny_llama(2) if which == "llama" else tiny_gpt2(2)
    targets = LLAMA_PROJ if which == "llama" else ["c_attn", "c_proj", "c_fc"]
    model = trained_model(base, targets).eval()
    ranks = model.export_lora(tmp_path)

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    kept = model.kept_ranks()
    zero = [n for n, k in kept.items() if k == 0]
    assert zero, "the fixture leaves one module at rank 0"
    assert ranks == {n: k for n, k in kept.items() if k > 0}
    assert sum(ranks.values()) == sum(kept.values())  # the kept budget
    assert not set(zero) & set(cfg["target_modules"])

    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert lora.peft_config["default"].peft_type == peft.PeftType.LORA
    for name, k in ranks.items():
        assert lora.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == k
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        ours, theirs, plain = model(input_ids=x).logits, lora(input_ids=x).logits, base(input_ids=x).logits
    assert max_rel_err(theirs, ours) <= 1e-5
    assert max_rel_err(plain, ours) > 1e-4, "the adapter must change the outputs, or the test means nothing"


def test_export_with_every_module_at_rank_zero_raises(tmp_path):
    import adalora_fast as af

    model = af.get_adalora_model(tiny_llama(1), af.AdaLoraConfig(init_r=2, target_r=1, total_step=10))
    for _, layer in model.adapted_layers:
        layer.select_ranks_([False] * layer.r)
    with pytest.raises(ValueError, match="rank 0"):
        model.export_lora(tmp_path)
