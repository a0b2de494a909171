"""Benchmark of inference after AdaLoRA: merged weights vs the plain base model vs the unmerged adapter.

A Llama-style model built from a config (random weights, no downloads; CPU: 4 layers, hidden 512, MLP
1376, batch 4 x 128, fp32; CUDA: 8 layers, hidden 2048, MLP 5504, batch 8 x 1024, bf16), every one of
the 7 projections adapted at init_r 12 with non-zero λ (as after training), forward only under
``torch.no_grad()``. Providers, all on the same weights and input ids: ``base`` (the plain base
model, the floor), ``merged`` (``model.merge()``: the ``SVDLinear`` wrappers stay, their forward is the
base layer alone), ``merge_and_unload`` (the original module types, merged weights) and ``unmerged``
(the adapter path: on CUDA the fused Triton inference kernel, on the CPU the PyTorch path). Goal:
``merged`` within 1% of ``base`` (ratio of medians <= 1.01). The check, before timing: every merged
weight of ``merged`` and ``merge_and_unload`` is exactly ``cast(W + dW)`` summed in fp32 (the logits'
difference to the unmerged path is printed, not judged: in bf16 it is rounding). Rows: op
``inference``, mode ``forward``, d_in / d_out = hidden / MLP width, tokens = batch x sequence, r =
init_r, in ``<out>/cpu_inference.csv`` or ``gpu_inference.csv``.

    python benchmarks/bench_inference.py [--out DIR] [--quick] [--no-csv]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from typing import Any

import harness
import torch
from harness import LLAMA_PROJ, Case

from adalora_fast.testing import max_rel_err

OP, MODE = "inference", "forward"
PROVIDERS = ("base", "merged", "merge_and_unload", "unmerged")
CPU_MODEL = {"layers": 4, "hidden": 512, "intermediate": 1376, "vocab": 1000, "batch": 4, "seq": 128}
GPU_MODEL = {"layers": 8, "hidden": 2048, "intermediate": 5504, "vocab": 32000, "batch": 8, "seq": 1024}
INIT_R = 12
GOAL = 1.01


def build(m: dict[str, int], device: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The four providers' models (``base`` and three adapted copies with the same adapter values)."""
    import adalora_fast as af

    base = harness.tiny_llama(m["layers"], m["hidden"], m["intermediate"], m["vocab"], seed=0, device=device)
    base = base.to(dtype).eval()
    cfg = af.AdaLoraConfig(init_r=INIT_R, target_r=8, total_step=100, target_modules=LLAMA_PROJ)
    adapted = af.get_adalora_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapted.adapted_layers:
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=g))
    adapted.eval()
    merged = copy.deepcopy(adapted)
    merged.merge()
    unloaded = copy.deepcopy(adapted).merge_and_unload().eval()
    return {"base": base, "merged": merged, "merge_and_unload": unloaded, "unmerged": adapted}


def forward_fn(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(input_ids=ids).logits

    return run


def setup(m: dict[str, int], device: str, dtype: torch.dtype) -> Case:
    models = build(m, device, dtype)
    ids = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=torch.Generator().manual_seed(2))
    fns = {p: forward_fn(models[p], ids.to(device)) for p in PROVIDERS}

    def check(name: str) -> tuple[bool, str]:
        """Every merged weight == cast(W + dW) summed in fp32 (fp64 for fp64 weights), exactly."""
        differ, wrappers = 0, dict(getattr(models[name], "adapted_layers", ()))
        for layer_name, layer in models["unmerged"].adapted_layers:
            w = models["base"].get_submodule(layer_name).weight
            acc = torch.promote_types(torch.float32, w.dtype)
            expected = (w.to(acc) + layer.get_delta_weight().to(acc)).to(w.dtype)
            got = wrappers[layer_name].base_layer if wrappers else models[name].get_submodule(layer_name)
            differ += int((got.weight != expected).sum())
        err = max_rel_err(fns[name]().float(), fns["unmerged"]().float())
        return differ == 0, (
            f"merged weights == cast(W + dW) in fp32, every layer: {differ} elements differ; "
            f"logits vs unmerged max rel err {err:.1e} (reported)"
        )

    row = {
        "op": OP,
        "mode": MODE,
        "d_in": m["hidden"],
        "d_out": m["intermediate"],
        "tokens": m["batch"] * m["seq"],
        "r": INIT_R,
        "dtype": dtype,
    }
    return Case(
        fns,
        row,
        baseline="base",
        check=check,
        checked=("merged", "merge_and_unload"),
        reference="unmerged",
        title=f"{OP} {MODE}: model {m}, all 7 projections adapted, init_r {INIT_R}, {str(dtype)[6:]}",
    )


def goal_line(res: harness.Results, device: str) -> str:
    merged, base = res.get(op=OP, provider="merged"), res.get(op=OP, provider="base")
    if merged is None or base is None:
        return f"GOAL merged vs base forward on {device} (goal <= {GOAL}): NOT MEASURED (see failures)"
    ratio = merged / base
    return (
        f"GOAL merged vs base forward on {device}: {merged:.3f} / {base:.3f} ms = {ratio:.3f} "
        f"(goal <= {GOAL}): {'MET' if ratio <= GOAL else 'NOT MET'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser, PROVIDERS, iters=(30, 5), cpu_warmup=(2, 2))
    args = harness.parse_args(parser, argv)
    cuda = torch.cuda.is_available()
    device, dtype, m = ("cuda", torch.bfloat16, GPU_MODEL) if cuda else ("cpu", torch.float32, CPU_MODEL)
    return harness.run(
        args,
        [m],
        lambda m: setup(m, device, dtype),
        title=f"{OP} benchmark ({MODE})",
        device=device,
        csv_names=("gpu_inference.csv", "cpu_inference.csv"),
        goals=lambda res: [goal_line(res, device)],
    )


if __name__ == "__main__":
    sys.exit(main())
