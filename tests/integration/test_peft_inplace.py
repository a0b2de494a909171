"""af.accelerate_peft: a live PEFT AdaLoRA model run through our layer op, regulariser and allocator in
place. Side by side with an untouched copy: equal per-step losses and masks (also when accelerated
mid-training, and with the triton backend in the interpreter); the same Parameter objects; PEFT's own
save_pretrained / merge_and_unload / disable_adapter still work; layers our op cannot run keep PEFT's
forward; restore() gives PEFT its methods back."""

from __future__ import annotations

import copy

import pytest
import torch

import adalora_fast as af
from adalora_fast.integrations.peft_inplace import find_peft_driver
from tests.helpers import LLAMA_PROJ, batches, peft_adalora, peft_pattern, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

# CAUSAL_LM: PeftModelForCausalLM runs the tuner's forward, which adds the regulariser (a PEFT model
# without a task type calls the transformers model directly and never adds it).
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=14, lora_dropout=0.0,
                task_type="CAUSAL_LM")  # fmt: skip


def _pair(base=None, targets=LLAMA_PROJ, **cfg):
    plain = peft_adalora(tiny_llama(2) if base is None else base, targets, **{**SCHEDULE, **cfg})
    fast = copy.deepcopy(plain)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, fast)]
    return plain, fast, opts


def _step(model, opt, x, step) -> float:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    model.base_model.update_and_allocate(step)  # PEFT's documented call, unchanged
    opt.zero_grad()
    return float(loss)


def _lockstep(plain, fast, opts, steps, data) -> None:
    for step in steps:
        lp, lf = _step(plain, opts[0], data[step], step), _step(fast, opts[1], data[step], step)
        assert lf == pytest.approx(lp, rel=1e-5, abs=0), step
        assert fast.peft_config["default"].rank_pattern == plain.peft_config["default"].rank_pattern, step


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("base", ["llama", "gpt2"])
def test_accelerated_peft_model_trains_as_peft_does(base):
    model, targets = (tiny_llama(2), LLAMA_PROJ) if base == "llama" else (tiny_gpt2(), ["c_attn", "c_proj"])
    plain, fast, opts = _pair(model, targets)
    params = {n: p for n, p in fast.named_parameters()}
    driver = af.accelerate_peft(fast)
    assert af.accelerate_peft(fast) is driver and not driver.peft_forward_layers
    assert type(fast) is type(plain)
    _lockstep(plain, fast, opts, range(14), batches(14, seed=5))
    assert {n: p for n, p in fast.named_parameters()} == params  # the same objects: the optimizer's
    assert driver.rank_allocator.finalized
    assert driver.total_kept_rank() == SCHEDULE["target_r"] * len(driver.layers)
    _same_weights(fast, plain)


def test_accelerated_mid_training_takes_over_peft_scores_and_masks():
    plain, fast, opts = _pair()
    data = batches(14, seed=6)
    for step in range(6):  # PEFT alone, into the budget phase: EMAs and a rank pattern exist
        _step(plain, opts[0], data[step], step)
        _step(fast, opts[1], data[step], step)
    af.accelerate_peft(fast)
    _lockstep(plain, fast, opts, range(6, 14), data)


def test_triton_backend_in_the_interpreter(monkeypatch):
    kernel = pytest.importorskip("adalora_fast.kernels.svd_linear")
    calls = []
    real = kernel.svd_linear
    monkeypatch.setattr(kernel, "svd_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain, fast, opts = _pair(tiny_llama(1))
    af.accelerate_peft(fast, backend="triton")
    data = batches(4, seed=7)
    for step in range(4):
        lp, lf = _step(plain, opts[0], data[step], step), _step(fast, opts[1], data[step], step)
        assert lf == pytest.approx(lp, rel=1e-4), step  # other kernels: fp32 rounding, not bitwise
    assert len(calls) == 4 * 7  # every adapted layer, every step, through the fused op


def test_peft_save_merge_and_disable_still_work(tmp_path):
    plain, fast, opts = _pair()
    af.accelerate_peft(fast)
    _lockstep(plain, fast, opts, range(14), batches(14, seed=8))
    fast.save_pretrained(tmp_path / "fast")
    plain.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fast", "plain"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    x = batches(1, seed=9)[0]
    fast.eval()
    with torch.no_grad():
        adapted = fast(input_ids=x).logits
        with fast.disable_adapter():
            base_only = fast(input_ids=x).logits
        merged = copy.deepcopy(fast).merge_and_unload()(input_ids=x).logits
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(2), str(tmp_path / "fast")).eval()
        torch.testing.assert_close(reloaded(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(base_only, tiny_llama(2)(input_ids=x).logits)
        torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_layers_our_op_cannot_run_keep_peft_forward_and_restore():
    from peft.tuners.adalora.layer import SVDLinear

    class OtherSVDLinear(SVDLinear):  # stands in for PEFT's quantised SVDLinear4bit / 8bitLt
        pass

    plain, fast, opts = _pair()
    first = next(m for m in fast.modules() if isinstance(m, SVDLinear))
    first.__class__ = OtherSVDLinear
    with pytest.warns(UserWarning, match="1 of 14 AdaLoRA layers keep PEFT's forward"):
        driver = af.accelerate_peft(fast)
    assert list(driver.peft_forward_layers) == ["model.layers.0.self_attn.q_proj"]
    assert "forward" not in vars(first)
    _lockstep(plain, fast, opts, range(6), batches(6, seed=10))  # still PEFT's numbers
    driver.restore()
    assert find_peft_driver(fast) is None
    assert not any("forward" in vars(m) for m in fast.modules() if isinstance(m, SVDLinear))
    assert "update_and_allocate" not in vars(fast.base_model)


def test_refusals():
    with pytest.raises(TypeError, match="needs a PEFT AdaLoRA model"):
        af.accelerate_peft(tiny_llama(2))
    pm = peft_adalora(tiny_llama(2), LLAMA_PROJ, **SCHEDULE)
    pm.merge_adapter()
    with pytest.raises(ValueError, match="is merged"):
        af.accelerate_peft(pm)


# ---- transformers' Trainer with a PEFT AdaLoRA model and af.AdaLoraCallback ------------------------------
def _trainer_run(model, out, callback, **kw):
    from transformers import Trainer, TrainingArguments

    from tests.integration.test_trainer import TokenDataset

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, seed=0, report_to="none", max_steps=14, logging_steps=1,
                             **{"save_strategy": "no", **kw})  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=TokenDataset(56), callbacks=[callback])


def test_trainer_with_a_peft_model_matches_peft_and_resumes_exactly(tmp_path):
    from tests.integration.test_trainer_checkpoints import PeftAllocation

    plain, fast, _ = _pair()
    reference = _trainer_run(plain, tmp_path / "peft", PeftAllocation())  # PEFT's own recipe
    reference.train()
    saving = dict(save_strategy="steps", save_steps=5)
    trainer = _trainer_run(fast, tmp_path / "fast", af.AdaLoraCallback(), **saving)
    trainer.train()
    assert find_peft_driver(fast) is not None  # accelerated by the callback
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (reference, trainer)]
    assert len(losses[1]) == 14 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert peft_pattern(fast) == peft_pattern(plain)  # (PEFT's save rewrites its keys in place)
    _same_weights(fast, plain)
    assert (tmp_path / "fast" / "checkpoint-5" / "adalora_training_state.safetensors").is_file()

    resumed = _pair()[1]  # the same initial adapters (peft_adalora seeds them)
    again = _trainer_run(resumed, tmp_path / "again", af.AdaLoraCallback(), **saving)
    again.train(resume_from_checkpoint=str(tmp_path / "fast" / "checkpoint-5"))  # in the budget phase
    assert peft_pattern(resumed) == peft_pattern(fast)
    sf, sr = fast.state_dict(), resumed.state_dict()
    for key in sf:
        assert torch.equal(sf[key], sr[key]), key
