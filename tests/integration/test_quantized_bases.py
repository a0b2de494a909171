"""AdaLoRA on bitsandbytes 4-bit (nf4; fp4 with double quantisation) and 8-bit bases, on the CPU.

Side by side with PEFT's SVDLinear4bit / SVDLinear8bitLt from PEFT's checkpoint: equal per-step losses and
identical masks; each loads the other's checkpoint with equal logits; resume through our checkpoint
continues exactly; the LoRA export loads in PEFT. Merging: dequantise, add dW in fp32, quantise again
(the merged weight is exactly that; within one quantisation step of W + dW); unmerge restores the
packed weight bit for bit; merge_and_unload keeps bitsandbytes layers. backend="triton" adds the
low-rank term through our kernels into bitsandbytes' output (equal to the torch path); torchao NF4
weights train and refuse to merge; GPTQ-style layers are refused; the QLoRA recipe under Trainer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import adalora_fast as af
from adalora_fast import backend
from adalora_fast.quantized import NF4_MAX_HALF_GAP, dequantize
from tests.helpers import LLAMA_PROJ, batches, tiny_llama, train_side_by_side

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12)
KINDS = ["nf4", "fp4-dq", "int8"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    # In and out features multiples of 64, bitsandbytes' 4-bit block: on CPUs with AVX512-BF16 its
    # inference forward repacks the weights into blocks (and fails on smaller ones).
    tiny_llama(2, hidden=64, intermediate=128).save_pretrained(folder)
    return folder


def quantized(folder, kind: str):
    cfg = transformers.BitsAndBytesConfig
    q = {
        "nf4": cfg(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "fp4-dq": cfg(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        ),  # fmt: skip
        "int8": cfg(load_in_8bit=True),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=q, device_map="cpu"
        )


def _peft_model(folder, kind, tmp_path):
    torch.manual_seed(1)
    cfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=LLAMA_PROJ, lora_alpha=8, lora_dropout=0.0,
                             **SCHEDULE)  # fmt: skip
    pm = peft.get_peft_model(quantized(folder, kind), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "peft-init")
    return pm


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("kind", KINDS)
def test_training_matches_peft_and_checkpoints_cross_load(base_dir, kind, tmp_path):
    pm = _peft_model(base_dir, kind, tmp_path)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("SVDLinear8bitLt" if kind == "int8" else "SVDLinear4bit")
    ours = af.AdaLoraModel.from_pretrained(
        quantized(base_dir, kind), tmp_path / "peft-init", is_trainable=True
    )
    pm.train()
    ours.train()
    data = batches(SCHEDULE["total_step"])
    assert train_side_by_side(pm, ours, _optimizer(pm), _optimizer(ours), data, range(len(data))) > 0
    assert sum(ours.kept_ranks().values()) == SCHEDULE["target_r"] * len(ours.adapted_names)

    x = batches(1, seed=3)[0]
    pm.eval()
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    theirs_from_ours = peft.PeftModel.from_pretrained(
        quantized(base_dir, kind), str(tmp_path / "ours")
    ).eval()
    ours_from_theirs = af.AdaLoraModel.from_pretrained(quantized(base_dir, kind), tmp_path / "peft")
    # Each loads the other's checkpoint with the other's logits. (The two trainings agree per step to
    # 1e-5 in the loss, asserted above; their weights differ by fp32 rounding.)
    expected = _logits(ours, x)
    torch.testing.assert_close(_logits(theirs_from_ours, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(ours_from_theirs, x), _logits(pm, x), rtol=1e-5, atol=1e-5)

    ours.export_lora(tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(quantized(base_dir, kind), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(_logits(lora, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_resume_continues_exactly(base_dir, kind, tmp_path):
    torch.manual_seed(0)
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, lora_dropout=0.0, **SCHEDULE)
    whole = af.get_adalora_model(quantized(base_dir, kind), cfg)
    data = batches(SCHEDULE["total_step"], seed=4)

    def train(model, opt, steps):
        for step in steps:
            model(input_ids=data[step], labels=data[step]).loss.backward()
            opt.step()
            model.update_and_allocate(step)
            opt.zero_grad()

    opt = _optimizer(whole)
    train(whole, opt, range(5))  # into the budget phase
    whole.save_pretrained(tmp_path / "ckpt")
    opt_state = copy.deepcopy(opt.state_dict())
    train(whole, opt, range(5, 12))

    resumed = af.AdaLoraModel.from_pretrained(quantized(base_dir, kind), tmp_path / "ckpt", is_trainable=True)
    opt2 = _optimizer(resumed)
    opt2.load_state_dict(opt_state)
    train(resumed, opt2, range(5, 12))
    assert resumed.rank_pattern == whole.rank_pattern
    for (name, a), (_, b) in zip(resumed.adapted_layers, whole.adapted_layers, strict=True):
        for k in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(a, k), getattr(b, k)), (name, k)


def _requantized(layer) -> torch.Tensor:
    """W + dW quantised again by bitsandbytes, independently of the layer's merge."""
    probe = copy.deepcopy(layer.base_layer)
    from adalora_fast.quantized import requantize_

    requantize_(probe, dequantize(probe) + layer.get_delta_weight().float())
    return dequantize(probe)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_on_quantized_bases(base_dir, kind):
    torch.manual_seed(0)
    model = af.get_adalora_model(
        quantized(base_dir, kind), af.AdaLoraConfig(target_modules=LLAMA_PROJ, **SCHEDULE)
    )
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.normal_()
    model.eval()
    x = batches(1, seed=5)[0]
    unmerged = _logits(model, x)
    packed = {n: layer.base_layer.weight.data.clone() for n, layer in model.adapted_layers}
    exact = {
        n: dequantize(layer.base_layer) + layer.get_delta_weight().float()
        for n, layer in model.adapted_layers
    }
    expected = {n: _requantized(layer) for n, layer in model.adapted_layers}
    model.merge()
    for name, layer in model.adapted_layers:
        got = dequantize(layer.base_layer)
        assert torch.equal(got, expected[name]), name  # the documented procedure, exactly
        err = (got - exact[name]).abs()
        if kind == "nf4":  # one nf4 step per block of 64: half the widest code gap x the block absmax
            blocks = exact[name].reshape(-1, 64).abs().amax(1, keepdim=True)
            assert (err.reshape(-1, 64) <= NF4_MAX_HALF_GAP * blocks * (1 + 1e-6)).all(), name
        elif kind == "int8":  # half of absmax(row) / 127, plus fp16 rounding of the input to quantise
            rows = exact[name].abs().amax(1, keepdim=True)
            assert (err <= rows / 127 * 0.5 + rows * 2**-10).all(), name
    merged = _logits(model, x)  # re-quantised: its distance from `unmerged` is bounded weight by weight above
    model.unmerge()
    for name, layer in model.adapted_layers:
        assert torch.equal(layer.base_layer.weight.data, packed[name]), name
    torch.testing.assert_close(_logits(model, x), unmerged)
    plain = model.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    torch.testing.assert_close(_logits(plain, x), merged)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_triton_backend_adds_the_low_rank_term_through_the_kernels(base_dir, kind, monkeypatch):
    """Opt-in (backend="triton"): the base product in bitsandbytes, the low-rank term through our kernels
    (Triton's interpreter on the CPU), equal to the torch path step by step."""
    kernel = pytest.importorskip("adalora_fast.kernels.base_plus_svd")
    calls = []
    real = kernel.y_plus_sb
    monkeypatch.setattr(kernel, "y_plus_sb", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    models = []
    for backend_name in ("torch", "triton"):
        cfg = af.AdaLoraConfig(target_modules=["q_proj", "v_proj"], backend=backend_name, **SCHEDULE)
        models.append(af.get_adalora_model(quantized(base_dir, kind), cfg))
    with torch.no_grad():
        for (_, a), (_, b) in zip(models[0].adapted_layers, models[1].adapted_layers, strict=True):
            a.lora_E.normal_()
            for k in ("lora_A", "lora_E", "lora_B"):
                getattr(b, k).copy_(getattr(a, k))
    opts = [_optimizer(m) for m in models]
    data = batches(3, seed=10)
    for step, x in enumerate(data):
        losses = []
        for model, opt in zip(models, opts, strict=True):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(float(loss))
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), step
    # 3 steps x (4 layers' forwards + the dx of layer 1's 2: layer 0's input needs no gradient).
    assert len(calls) == 3 * (4 + 2)
    for (name, a), (_, b) in zip(models[0].adapted_layers, models[1].adapted_layers, strict=True):
        for k in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(b, k), getattr(a, k), rtol=1e-4, atol=1e-6, msg=f"{name}.{k}")


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_qlora_recipe_with_trainer(base_dir, tmp_path, optim):
    from transformers import Trainer, TrainingArguments

    from tests.integration.test_trainer import TokenDataset

    base = peft.prepare_model_for_kbit_training(quantized(base_dir, "nf4"), use_gradient_checkpointing=True)
    cfg = af.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, target_modules=LLAMA_PROJ)
    model = af.get_adalora_model(base, cfg)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             use_cpu=True, report_to="none", optim=optim, gradient_checkpointing=True,
                             save_steps=4, learning_rate=1e-2, logging_steps=1)  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenDataset(32), callbacks=[af.AdaLoraCallback()]
    )
    trainer.train()
    assert model.total_kept_rank() == 2 * len(model.adapted_names)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    saved = {f.name for f in (tmp_path / "checkpoint-8").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved


def test_torchao_nf4_weights_train_through_the_torch_path_and_refuse_to_merge():
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    torch.manual_seed(0)
    quantised, plain = tiny_llama(2).to(torch.bfloat16), tiny_llama(2).to(torch.bfloat16)
    for (name, module), other in zip(quantised.named_modules(), plain.modules(), strict=True):
        if name.endswith("proj"):
            packed = nf4.to_nf4(module.weight.data, 32, 16)
            module.weight = torch.nn.Parameter(packed, requires_grad=False)
            # The same weights, dequantised: what F.linear computes with.
            other.weight = torch.nn.Parameter(packed.get_original_weight(), requires_grad=False)
    cfg = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="triton", **SCHEDULE)
    ours = af.get_adalora_model(quantised, cfg)
    # The reference on the torch path (bf16 tl.dot is wrong in the interpreter).
    reference = af.get_adalora_model(
        plain, af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **SCHEDULE)
    )
    with torch.no_grad():
        for _, layer in ours.adapted_layers:
            layer.lora_E.normal_()  # adapters that change the output
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    x = batches(1, seed=7)[0]
    backend.reset_warnings()
    with pytest.warns(UserWarning, match="the base weight is a NF4Tensor"):
        loss = ours(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, x), _logits(reference, x), rtol=0, atol=0)
    before = {n: layer.base_layer.weight for n, layer in ours.adapted_layers}
    with pytest.raises(TypeError, match=r"cannot merge 'model\.layers\.0\.self_attn\.q_proj'.*NF4Tensor"):
        ours.merge()
    with pytest.raises(TypeError, match="NF4Tensor"):
        ours.merge_and_unload()
    assert all(not layer.merged and layer.base_layer.weight is before[n] for n, layer in ours.adapted_layers)
    assert ours.adapted_names  # nothing unloaded


def test_gptq_style_layers_are_refused_naming_the_type():
    class QuantLinear(torch.nn.Module):  # stands in for gptqmodel's / AutoGPTQ's packed linears
        def forward(self, x):
            return x

    model = tiny_llama(2)
    model.model.layers[0].self_attn.q_proj = QuantLinear()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj': unsupported base layer QuantLinear"
    ):
        af.get_adalora_model(model, af.AdaLoraConfig(target_modules=["q_proj"], **SCHEDULE))
    assert [n for n, _ in model.named_modules()] == before


def test_compaction_on_a_quantised_base_keeps_the_outputs(base_dir, tmp_path):
    torch.manual_seed(0)
    model = af.get_adalora_model(
        quantized(base_dir, "nf4"), af.AdaLoraConfig(target_modules=LLAMA_PROJ, **SCHEDULE)
    )
    opt = _optimizer(model)
    data = batches(SCHEDULE["total_step"], seed=8)
    for step, x in enumerate(data):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    x = batches(1, seed=9)[0]
    model.eval()
    before = _logits(model, x)
    model.save_pretrained(tmp_path / "soft")
    assert model.compact(opt)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_E" in n) == model.total_kept_rank()
    torch.testing.assert_close(_logits(model, x), before, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "compact")
    reloaded = af.AdaLoraModel.from_pretrained(quantized(base_dir, "nf4"), tmp_path / "compact")
    torch.testing.assert_close(_logits(reloaded, x), before, rtol=1e-5, atol=1e-6)
