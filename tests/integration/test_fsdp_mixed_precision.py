"""FSDP2's bf16 ``MixedPrecisionPolicy`` with trained parameters beside the adapters (trained biases,
``modules_to_save``), which FSDP2 ignores and so does not cast: ``adalora_fast.fully_shard`` has them
compute in bf16 like the base around them, their gradients and values staying fp32. On a 1-rank gloo
group in the test process; the 2-rank run with the adapters alone is in ``test_fsdp_shard.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, tiny_gpt2, tiny_llama
from tests.integration.test_fsdp_helpers import NEEDS_GLOO, one_rank_group

pytestmark = NEEDS_GLOO
BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
COMMON = {"total_step": 6, "init_lora_weights": False, "backend": "torch"}  # E != 0: B and A get grads

MODELS: dict[str, Callable[[], af.AdaLoraModel]] = {
    "modules_to_save": lambda: af.get_adalora_model(
        tiny_llama(2),
        af.AdaLoraConfig(target_modules=LLAMA_PROJ, modules_to_save=["lm_head", "input_layernorm"], **COMMON),
    ),
    "bias=all": lambda: af.get_adalora_model(
        tiny_gpt2(2), af.AdaLoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, bias="all", **COMMON)
    ),
    "bias=lora_only": lambda: af.get_adalora_model(
        tiny_gpt2(2),
        af.AdaLoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only", **COMMON),
    ),
}


def _seeded(name: str) -> af.AdaLoraModel:
    torch.manual_seed(0)
    return MODELS[name]()


def _non_adapter_params_in(model: af.AdaLoraModel, dtype: torch.dtype) -> af.AdaLoraModel:
    """``model`` computing as FSDP2's ``param_dtype`` should have it: every parameter but the adapters'
    (frozen base and trained biases / modules alike) in ``dtype``."""
    adapters = {id(p) for _, layer in model.adapted_layers for p in layer._parameters.values()}
    for p in model.parameters():
        if id(p) not in adapters:
            p.data = p.data.to(dtype)
    return model


def _extra_trained(model: af.AdaLoraModel) -> dict[str, torch.nn.Parameter]:
    """The trained parameters that are not adapter factors (what the policy has to cast)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


@pytest.mark.parametrize("name", list(MODELS))
def test_trained_biases_and_modules_to_save_compute_in_bf16(name, tmp_path):
    x = batches(1)[0]
    reference = _non_adapter_params_in(_seeded(name), torch.bfloat16)
    reference(input_ids=x, labels=x).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    with one_rank_group(tmp_path):
        model = af.fully_shard(_seeded(name), mp_policy=BF16)
        extra = _extra_trained(model)
        assert extra, "the case should train parameters beside the adapters"
        model(input_ids=x, labels=x).loss.backward()
        # The gradients of bf16 compute, reaching the fp32 parameters; those are back in place.
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert type(p) is torch.nn.Parameter and p.dtype == torch.float32, n
                assert p.grad.dtype == torch.float32 and torch.equal(p.grad, expected[n].float()), n
        assert model._adalora_replicated.reductions == 1
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        opt.step()
        state = model.state_dict()
        assert all(state[n].dtype == torch.float32 for n in extra)


def test_the_fp32_parameter_comes_back_when_the_forward_raises(tmp_path):
    with one_rank_group(tmp_path):
        model = af.fully_shard(_seeded("modules_to_save"), mp_policy=BF16)
        head = model.model.lm_head.modules_to_save["default"]
        weight = head.weight
        with pytest.raises(RuntimeError):
            head(torch.ones(2, 5, dtype=torch.bfloat16))  # 5 features where the head takes 32
        assert head._parameters["weight"] is weight
