"""Benchmark of the orthogonal regulariser's forward+backward: fused Triton kernels vs torch vs PEFT.

``R = mean over all A, B of ||A A^T - I||_F, ||B^T B - I||_F`` (``docs/numeric_contract.md`` §2 item 8) over a
Llama-7B-shaped set of adapters built without the base weights: 32 layers x 7 projections (q, k, v,
o: 4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 -> 4096), init_r 12, fp32 factors with
random non-zero values (PEFT's init: N(0, 0.02)). Providers, all on the same tensors:

* ``fused``: ``adalora_fast.orth_regularization(..., backend="triton")`` (kernels/orth_defect.py:
  2 launches forward, 1 backward, whatever the number of layers);
* ``torch``: the regulariser's torch path (``regularizer.orth_regularization_torch``: layers grouped
  by shape, one batched matmul and norm per group);
* ``peft``: PEFT 0.21's regulariser as ``AdaLoraModel.forward`` computes it: its loop over
  ``named_parameters()`` (lora_A, lora_B, lora_E per module, PEFT's order), one
  matmul, eye, subtraction and norm per factor, reproduced on the same tensors (the DeepSpeed branch
  for zero-size parameters is not taken here).

Mode ``fwd+bwd``: the regulariser and its backward, every gradient set to None before each call
(``zero_grad(set_to_none=True)``). Before timing, ``fused`` and ``peft`` are checked against
``torch`` (value and every gradient, max |diff| / max |ref| <= 1e-4); a provider that fails is not
timed. On CUDA: timed with ``triton.testing.do_bench`` (median), rows appended to
``<out>/gpu_orth_reg.csv``. On the CPU: ``torch`` and ``peft`` on a smaller model (32 x 7 at
d = 512, d_ff = 1376, r 12), timed round-robin (``harness.time_cpu_interleaved``), appended to
``<out>/cpu_orth_reg.csv``; the fused kernels would run in Triton's interpreter there. CSV columns
are ``harness.COLUMNS`` (op ``orth_reg``, mode ``fwd+bwd``, d_in / d_out / tokens empty, r = init_r).
The ATen ops (views excluded) and Triton launches of one call of each provider are printed too.

    python benchmarks/bench_orth_reg.py [--out DIR] [--providers fused torch peft] [--no-csv]
    pytest benchmarks/bench_orth_reg.py            # the CPU model, with pytest-benchmark
"""

from __future__ import annotations

import argparse
import statistics
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    CPU_ADAPTERS,
    GPU_ADAPTERS,
    PEFT_ADAPTER,
    add_common_args,
    append_rows,
    describe_environment,
    force_compiled_triton,
    free_memory,
    gpu_median_ms,
    make_adapters,
    max_rel_err,
    op_counts,
    script_end,
    script_start,
    time_cpu_interleaved,
)
from torch import nn

OP = "orth_reg"
MODE = "fwd+bwd"
PROVIDERS = ("fused", "torch", "peft")
CPU_PROVIDERS = ("torch", "peft")
GPU_MODEL = GPU_ADAPTERS
CPU_MODEL = CPU_ADAPTERS
GPU_CSV, CPU_CSV = "gpu_orth_reg.csv", "cpu_orth_reg.csv"
TOL = 1e-4
SEED = 0
ADAPTER = PEFT_ADAPTER


# ---- adapters (harness.make_adapters: PEFT-named, no base weights) ------------------------------
def factors(named: Sequence[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(lora_As, lora_Bs) in layer order."""
    As = [p for n, p in named if ".lora_A." in n]
    Bs = [p for n, p in named if ".lora_B." in n]
    return As, Bs


# ---- providers ----------------------------------------------------------------------------------
def peft_orth_reg(named: Sequence[tuple[str, torch.Tensor]], adapter: str = ADAPTER) -> torch.Tensor:
    """PEFT 0.21's regulariser, the loop of ``AdaLoraModel.forward`` (peft/tuners/adalora/model.py)."""
    regu_loss = 0
    num_param = 0
    for n, p in named:
        if ("lora_A" in n or "lora_B" in n) and adapter in n:
            para_cov = p @ p.T if "lora_A" in n else p.T @ p
            I = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))  # noqa: E741
            I.requires_grad = False
            num_param += 1
            regu_loss += torch.norm(para_cov - I, p="fro")
    if num_param > 0:
        regu_loss = regu_loss / num_param
    else:
        regu_loss = 0
    return regu_loss


def provider_fn(provider: str, named: Sequence[tuple[str, nn.Parameter]]) -> Callable[[], torch.Tensor]:
    """The regulariser of ``provider`` on these adapters, as a closure returning R."""
    import adalora_fast as af
    from adalora_fast.functional import orth_regularization_torch

    As, Bs = factors(named)
    if provider == "fused":
        return lambda: af.orth_regularization(As, Bs, backend="triton")
    if provider == "torch":
        return lambda: orth_regularization_torch(As, Bs)
    if provider == "peft":
        return lambda: peft_orth_reg(named)
    raise ValueError(f"unknown provider {provider!r}")


def step_fn(fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> Callable[[], None]:
    """One timed call: gradients to None, R, backward."""

    def step() -> None:
        for p in params:
            p.grad = None
        fn().backward()

    return step


def fused_problem(device: torch.device) -> str | None:
    """Why ``fused`` would not run the compiled kernels on ``device`` (it must not be reported), or None."""
    from adalora_fast import backend

    if backend.resolve(OP, "triton", device) != "triton":
        return backend.explain(OP, "triton", device)
    if backend.interpreting():
        return "the kernels run in Triton's interpreter (TRITON_INTERPRET set before import)"
    return None


# ---- correctness and op counts ------------------------------------------------------------------
def value_and_grads(fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    value = fn()
    value.backward()
    out = [value.detach().clone()] + [p.grad for p in params]
    for p in params:
        p.grad = None
    return out


def check(
    candidate: Callable[[], torch.Tensor],
    reference: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[bool, float, float]:
    """(ok, value error, worst gradient error) of ``candidate`` against ``reference``."""
    got = value_and_grads(candidate, params)
    want = value_and_grads(reference, params)
    value_err = max_rel_err(got[0], want[0])
    grad_err = max(max_rel_err(g, w) for g, w in zip(got[1:], want[1:], strict=True))
    ok = value_err <= TOL and grad_err <= TOL  # NaN compares False: a failure
    return ok, value_err, grad_err


def call_counts(step: Callable[[], None]) -> tuple[int, int]:
    """(ATen ops other than views, Triton launches of the fused kernels) of one ``step()``."""
    launches = Counter()
    if "adalora_fast.kernels.orth_defect" in sys.modules:
        launches = Counter(sys.modules["adalora_fast.kernels.orth_defect"].LAUNCHES)
    aten, _ = op_counts(step)
    after = Counter()
    if "adalora_fast.kernels.orth_defect" in sys.modules:
        after = Counter(sys.modules["adalora_fast.kernels.orth_defect"].LAUNCHES)
    return aten, sum((after - launches).values())


# ---- runs ---------------------------------------------------------------------------------------
def row(provider: str, r: int, ms: float) -> dict[str, Any]:
    return {"op": OP, "mode": MODE, "provider": provider, "r": r, "dtype": "float32", "median_ms": ms}


def checked_providers(
    named: Sequence[tuple[str, nn.Parameter]], providers: Sequence[str], failures: list[str]
) -> dict[str, Callable[[], None]]:
    """The timed closures of the providers that pass their check against ``torch``."""
    As, Bs = factors(named)
    params = As + Bs
    reference = provider_fn("torch", named)
    steps = {}
    for provider in providers:
        try:
            if provider == "fused":
                problem = fused_problem(As[0].device)
                if problem is not None:
                    raise RuntimeError(f"{problem}; not timed")
            fn = provider_fn(provider, named)
            if provider != "torch":
                ok, value_err, grad_err = check(fn, reference, params)
                verdict = "OK" if ok else "FAILED"
                print(f"check {provider} vs torch: value {value_err:.1e}, grads {grad_err:.1e}: {verdict}")
                if not ok:
                    raise RuntimeError(f"value {value_err:.1e} / grads {grad_err:.1e} > tol {TOL:g}")
            steps[provider] = step_fn(fn, params)
            aten, launches = call_counts(steps[provider])
            print(f"ops {provider}: {aten} ATen ops (views excluded) + {launches} Triton launches per call")
        except Exception as err:
            failures.append(f"{provider}: {type(err).__name__}: {err}")
            print(f"FAILED {provider}: {type(err).__name__}: {err}", file=sys.stderr)
            traceback.print_exc()
        finally:
            for p in params:
                p.grad = None
    return steps


def summary(ms: dict[str, float]) -> None:
    print("\n| provider | fwd+bwd ms | vs peft |\n|---|---:|---:|")
    for provider, t in ms.items():
        speedup = f"{ms['peft'] / t:.1f}x" if "peft" in ms else "-"
        print(f"| {provider} | {t:.3f} | {speedup} |")


def run_gpu(providers: Sequence[str], csv_path: Path | None, warmup: int, rep: int) -> list[str]:
    failures: list[str] = []
    m = GPU_MODEL
    named = make_adapters(m["layers"], m["d"], m["d_ff"], m["r"], "cuda", seed=SEED)
    print(
        f"adapters: {len(named) // 3} adapted layers, {sum(p.numel() for _, p in named) / 1e6:.1f}M elements"
    )
    steps = checked_providers(named, providers, failures)
    ms = {}
    for provider, step in steps.items():
        try:
            ms[provider] = gpu_median_ms(step, warmup=warmup, rep=rep)
            print(f"  {provider:5s} {MODE} {ms[provider]:9.3f} ms", flush=True)
        except Exception as err:
            failures.append(f"{provider} timing: {type(err).__name__}: {err}")
            traceback.print_exc()
        free_memory()
    if csv_path is not None and ms:
        append_rows(csv_path, [row(p, m["r"], t) for p, t in ms.items()])
    summary(ms)
    return failures


def run_cpu(providers: Sequence[str], csv_path: Path | None, iters: int) -> list[str]:
    failures: list[str] = []
    skipped = [p for p in providers if p not in CPU_PROVIDERS]
    if skipped:
        print(f"note: {skipped} skipped on the CPU (the fused kernels would run in Triton's interpreter)")
    m = CPU_MODEL
    named = make_adapters(m["layers"], m["d"], m["d_ff"], m["r"], "cpu", seed=SEED)
    steps = checked_providers(named, [p for p in CPU_PROVIDERS if p in providers], failures)
    if not steps:
        return failures
    times = time_cpu_interleaved(steps, warmup=3, iters=iters)
    ms = {p: statistics.median(t) for p, t in times.items()}
    for provider, t in ms.items():
        print(f"  {provider:5s} {MODE} {t:9.3f} ms")
    if csv_path is not None:
        append_rows(csv_path, [row(p, m["r"], t) for p, t in ms.items()])
    summary(ms)
    return failures


# ---- pytest-benchmark (CPU model) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_adapters() -> list[tuple[str, nn.Parameter]]:
    m = CPU_MODEL
    return make_adapters(m["layers"], m["d"], m["d_ff"], m["r"], "cpu", seed=SEED)


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_orth_reg_cpu(benchmark: Any, cpu_adapters: Any, provider: str) -> None:
    if provider == "peft":
        pytest.importorskip("peft")
    As, Bs = factors(cpu_adapters)
    m = CPU_MODEL
    benchmark.group = f"{OP} {MODE} {m['layers']}x7 d {m['d']}/{m['d_ff']} r{m['r']} fp32 (CPU)"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
    step = step_fn(provider_fn(provider, cpu_adapters), As + Bs)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)


def test_peft_matches_torch_cpu(cpu_adapters: Any) -> None:
    As, Bs = factors(cpu_adapters)
    assert len(As) == len(Bs) == CPU_MODEL["layers"] * 7
    ok, value_err, grad_err = check(
        provider_fn("peft", cpu_adapters), provider_fn("torch", cpu_adapters), As + Bs
    )
    assert ok, (value_err, grad_err)


# ---- script mode --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--iters", type=int, default=30, help="timed calls per provider (CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda, csv_path = script_start(args.out, args.no_csv, args.threads, GPU_CSV, CPU_CSV)
    print(f"# {OP} benchmark ({MODE})\n\n{describe_environment()}\n", flush=True)
    if cuda:
        force_compiled_triton()
        print(f"GPU model {GPU_MODEL}, fp32, do_bench median (warmup {args.warmup} ms, rep {args.rep} ms)\n")
        failures = run_gpu(args.providers, csv_path, args.warmup, args.rep)
    else:
        print(f"no CUDA: CPU model {CPU_MODEL}, fp32, {args.iters} round-robin calls\n", flush=True)
        failures = run_cpu(args.providers, csv_path, args.iters)
    return script_end(failures, csv_path)


if __name__ == "__main__":
    sys.exit(main())
