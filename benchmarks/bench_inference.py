"""Benchmark of inference after AdaLoRA: merged weights vs the plain base model vs the unmerged adapter.

A Llama-style model built from a config (random weights, no downloads), every one of the 7
projections adapted at init_r 12 with non-zero λ (as after training), forward only under
``torch.no_grad()``. Providers, all on the same weights and the same input ids:

* ``base``: the plain base model (the floor);
* ``merged``: ``model.merge()`` — the adapted layers stay ``SVDLinear`` wrappers whose forward is
  the base layer alone (``unmerge()`` remains possible);
* ``merge_and_unload``: ``model.merge_and_unload()`` — the original module types, merged weights;
* ``unmerged``: the adapter path (``SVDLinear`` forward: base GEMM plus the low-rank term; on CUDA
  the fused Triton inference kernel, on the CPU the PyTorch path).

Goal: ``merged`` within 1% of ``base`` (ratio of medians <= 1.01). Outputs of merged and unmerged are
checked against each other first (max |diff| / max |ref| <= 1e-4 in fp32). On the CPU the providers
are timed round-robin (``harness.time_cpu_interleaved``); on CUDA with ``do_bench`` medians (bf16
model). Rows go to ``<out>/cpu_inference.csv`` or ``gpu_inference.csv`` (op ``inference``, mode
``forward``, tokens = batch x sequence, r = init_r, d_in / d_out = hidden / MLP width).

    python benchmarks/bench_inference.py [--out DIR] [--quick] [--no-csv]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from harness import (
    LLAMA_PROJ,
    add_common_args,
    append_rows,
    describe_environment,
    force_compiled_triton,
    gpu_median_ms,
    max_rel_err,
    script_end,
    script_start,
    time_cpu_interleaved,
    tiny_llama,
)

OP, MODE = "inference", "forward"
PROVIDERS = ("base", "merged", "merge_and_unload", "unmerged")
CPU_MODEL = {"layers": 4, "hidden": 512, "intermediate": 1376, "vocab": 1000, "batch": 4, "seq": 128}
GPU_MODEL = {"layers": 8, "hidden": 2048, "intermediate": 5504, "vocab": 32000, "batch": 8, "seq": 1024}
INIT_R = 12
GOAL = 1.01
TOL = 1e-4


def build(m: dict[str, int], device: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The four providers' models (``base`` and three adapted copies with the same adapter values)."""
    import adalora_fast as af

    base = tiny_llama(m["layers"], m["hidden"], m["intermediate"], m["vocab"], seed=0, device=device)
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


def check_merge(models: dict[str, torch.nn.Module], fns: dict[str, Callable[[], Any]], ids: torch.Tensor,
                dtype: torch.dtype) -> list[str]:  # fmt: skip
    """The merge's invariant, exactly: every merged weight is ``cast(W + dW)`` summed in fp32 (fp64 for
    fp64 weights). Then the logits: in fp32 merged and unmerged must agree to ``TOL``; in bf16 a merged
    weight is rounded once more (to bf16) than the unmerged path's, so the two differ by bf16
    rounding: printed with both paths' error against the model in float64, not judged."""
    failures = []
    plain = models["base"]
    merged = dict(models["merged"].adapted_layers)
    worst = 0
    for name, layer in models["unmerged"].adapted_layers:
        w = plain.get_submodule(name).weight
        acc = torch.promote_types(torch.float32, w.dtype)
        expected = (w.to(acc) + layer.get_delta_weight().to(acc)).to(w.dtype)
        got = merged[name].base_layer.weight
        worst = max(worst, int((got != expected).sum()))
    status = "OK" if worst == 0 else "FAILED"
    print(f"check merged weights == cast(W + dW) in fp32, every layer: {worst} elements differ: {status}")
    if worst:
        failures.append(f"merged weights are not cast(W + dW): {worst} elements differ in a layer")
    reference = fns["unmerged"]().float()
    errs = {p: max_rel_err(fns[p]().float(), reference) for p in ("merged", "merge_and_unload")}
    if dtype == torch.float32:
        for p, err in errs.items():
            status = "OK" if err <= TOL else "FAILED"
            print(f"check {p} vs unmerged: max rel err {err:.1e} (tol {TOL:g}): {status}")
            if err > TOL:
                failures.append(f"{p} differs from the unmerged adapter path: {err:.1e}")
        return failures
    ref_model = copy.deepcopy(models["unmerged"]).double()
    with torch.no_grad():
        ref64 = ref_model(input_ids=ids).logits
    del ref_model
    vs64 = {p: max_rel_err(fns[p]().double(), ref64) for p in ("unmerged", "merged")}
    print(f"{str(dtype)[6:]} logits, max rel err: merged vs unmerged {errs['merged']:.1e}, "
          f"merge_and_unload vs unmerged {errs['merge_and_unload']:.1e}; against the model in float64: "
          f"unmerged {vs64['unmerged']:.1e}, merged {vs64['merged']:.1e} (reported: rounding)")  # fmt: skip
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds")
    parser.add_argument("--iters", type=int, help="CPU round-robin rounds (default 30; 5 with --quick)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        force_compiled_triton()
    csvs = ("gpu_inference.csv", "cpu_inference.csv")
    cuda, csv_path = script_start(args.out, args.no_csv, args.threads, *csvs)
    device, dtype, m = ("cuda", torch.bfloat16, GPU_MODEL) if cuda else ("cpu", torch.float32, CPU_MODEL)
    print(f"# {OP} benchmark ({MODE})\n\n{describe_environment()}\n")
    print(f"model {m}, all 7 projections adapted, init_r {INIT_R}, {str(dtype)[6:]}, {device}\n", flush=True)
    failures: list[str] = []
    models = build(m, device, dtype)
    ids = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    fns = {p: forward_fn(models[p], ids) for p in PROVIDERS}
    failures += check_merge(models, fns, ids, dtype)
    if cuda:
        ms = {p: gpu_median_ms(fn, warmup=args.warmup, rep=args.rep) for p, fn in fns.items()}
    else:
        iters = args.iters or (5 if args.quick else 30)
        times = time_cpu_interleaved(fns, warmup=2, iters=iters)
        ms = {p: statistics.median(ts) for p, ts in times.items()}
        ratios = [a / b for a, b in zip(times["merged"], times["base"], strict=True)]
        print(f"\n{iters} round-robin rounds; merged/base per round: median {statistics.median(ratios):.3f}")
    print("\n| provider | forward ms | vs base |\n|---|---:|---:|")
    for p in PROVIDERS:
        print(f"| {p} | {ms[p]:.3f} | {ms[p] / ms['base']:.3f} |")
    ratio = ms["merged"] / ms["base"]
    print(
        f"GOAL merged vs base forward on {device}: {ms['merged']:.3f} / {ms['base']:.3f} ms = {ratio:.3f} "
        f"(goal <= {GOAL}): {'MET' if ratio <= GOAL else 'NOT MET'}"
    )
    if csv_path is not None:
        tokens = m["batch"] * m["seq"]
        rows = [
            {"op": OP, "mode": MODE, "provider": p, "d_in": m["hidden"], "d_out": m["intermediate"],
             "tokens": tokens, "r": INIT_R, "dtype": str(dtype)[6:], "median_ms": ms[p]}
            for p in PROVIDERS
        ]  # fmt: skip
        append_rows(csv_path, rows)
    return script_end(failures, csv_path)


if __name__ == "__main__":
    sys.exit(main())
