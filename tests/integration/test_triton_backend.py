"""Backend "triton" end to end: a training run (losses and rank patterns) equals the torch backend's, and
torch.compile(fullgraph=True) of a model whose layers run the fused ops matches eager.

On the CPU the kernels run in Triton's interpreter; on a GPU (``TRITON_INTERPRET=0``) compiled.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adalora_fast as af
from adalora_fast.testing import max_rel_err
from tests.helpers import LLAMA_PROJ, kernel_devices, tiny_llama

pytest.importorskip("adalora_fast.kernels.svd_linear")
DEVICES = kernel_devices()


def _train(backend: str, device: str, steps: int, batches) -> tuple[list[float], list[dict]]:
    base = tiny_llama(1, hidden=32, intermediate=48, seed=0).to(device)
    cfg = af.AdaLoraConfig(
        init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=steps, lora_alpha=16,
        target_modules=LLAMA_PROJ, backend=backend,
    )  # fmt: skip
    torch.manual_seed(1)
    model = af.get_adalora_model(base, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses, patterns = [], []
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
        patterns.append(copy.deepcopy(model.rank_pattern))
    return losses, patterns


@pytest.mark.parametrize("device", DEVICES)
def test_training_run_matches_torch_backend(device):
    steps = 10
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 64, (2, 8), generator=g) for _ in range(steps)]
    fused_losses, fused_patterns = _train("triton", device, steps, batches)
    torch_losses, torch_patterns = _train("torch", device, steps, batches)
    for a, b in zip(fused_losses, torch_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (fused_losses, torch_losses)
    assert fused_patterns == torch_patterns
    final = fused_patterns[-1]
    assert sum(sum(v) for v in final.values()) == 2 * len(final)  # target_r x matrices kept


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    base = tiny_llama(1, hidden=32, intermediate=48, seed=0).to(device)
    cfg = af.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=LLAMA_PROJ, backend="triton")
    model = af.get_adalora_model(base, cfg)
    for _, layer in model.adapted_layers:
        with torch.no_grad():
            layer.lora_E.normal_()
    ids = torch.randint(0, 64, (2, 8), device=device)
    eager = model(input_ids=ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model.model, fullgraph=True)  # fullgraph: any graph break is an error
    out = compiled(input_ids=ids).logits
    assert max_rel_err(out, eager) <= 1e-5
    out.float().pow(2).mean().backward()
    assert all(layer.lora_A.grad is not None for _, layer in model.adapted_layers)
