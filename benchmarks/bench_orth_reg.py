"""Benchmark of the orthogonal regulariser's forward+backward: fused Triton kernels vs torch vs PEFT.

``R = mean over all A, B of ||A A^T - I||_F, ||B^T B - I||_F`` (``docs/numeric_contract.md`` §2 item 8)
over a Llama-shaped adapter set without base weights (``harness.make_adapters``: on CUDA 32 layers x 7
projections at d 4096 / MLP 11008, on the CPU d 512 / MLP 1376; r 12, fp32, N(0, 0.02)). Providers,
all on the same tensors: ``fused`` (``adalora_fast.orth_regularization(..., backend="triton")``,
kernels/orth_defect.py; CUDA only), ``torch`` (``functional.orth_regularization_torch``: one batched
matmul and norm per shape group) and ``peft`` (PEFT 0.21's loop of ``AdaLoraModel.forward`` over
``named_parameters()``, reproduced on the same tensors). Mode ``fwd+bwd``: R and its backward, every
gradient set to None first. The check, before timing: ``fused`` and ``peft`` give ``torch``'s value and
every gradient (max rel <= 1e-4). The ATen ops and Triton launches of one call are printed. Rows: op
``orth_reg``, mode ``fwd+bwd``, r 12, in ``<out>/gpu_orth_reg.csv`` or ``cpu_orth_reg.csv``.

    python benchmarks/bench_orth_reg.py [--out DIR] [--quick] [--providers fused torch peft] [--no-csv]
    pytest benchmarks/bench_orth_reg.py --benchmark-only     # the CPU model, with pytest-benchmark
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import harness
import pytest
import torch
from harness import PEFT_ADAPTER, Case
from torch import nn

from adalora_fast.testing import max_rel_err

OP, MODE = "orth_reg", "fwd+bwd"
PROVIDERS = ("fused", "torch", "peft")
TOL = 1e-4
SEED = 0


def peft_orth_reg(named: Sequence[tuple[str, torch.Tensor]], adapter: str = PEFT_ADAPTER) -> torch.Tensor:
    """PEFT 0.21's regulariser, the loop of ``AdaLoraModel.forward`` (peft/tuners/adalora/model.py)."""
    regu_loss, num_param = 0, 0
    for n, p in named:
        if ("lora_A" in n or "lora_B" in n) and adapter in n:
            para_cov = p @ p.T if "lora_A" in n else p.T @ p
            I = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))  # noqa: E741
            I.requires_grad = False
            num_param += 1
            regu_loss += torch.norm(para_cov - I, p="fro")
    return regu_loss / num_param if num_param > 0 else 0


def provider_fn(provider: str, named: Sequence[tuple[str, nn.Parameter]]) -> Callable[[], torch.Tensor]:
    """The regulariser of ``provider`` on these adapters, as a closure returning R."""
    import adalora_fast as af
    from adalora_fast.functional import orth_regularization_torch

    As, Bs = [p for n, p in named if ".lora_A." in n], [p for n, p in named if ".lora_B." in n]
    fns = {
        "fused": lambda: af.orth_regularization(As, Bs, backend="triton"),
        "torch": lambda: orth_regularization_torch(As, Bs),
        "peft": lambda: peft_orth_reg(named),
    }
    return fns[provider]


def value_and_grads(fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    value = fn()
    value.backward()
    out = [value.detach().clone()] + [p.grad for p in params]
    for p in params:
        p.grad = None
    return out


def setup(m: dict[str, int], providers: Sequence[str], device: str) -> Case:
    named = harness.make_adapters(m["layers"], m["d"], m["d_ff"], m["r"], device, seed=SEED)
    params = [p for n, p in named if ".lora_E." not in n]
    wanted = ("torch", "peft", *harness.timed_here(providers, device))
    fns = {p: provider_fn(p, named) for p in PROVIDERS if p in wanted}

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            for p in params:
                p.grad = None
            fn().backward()

        return call

    def check(name: str) -> tuple[bool, str]:
        problem = harness.fused_problem(OP, params[0].device) if name == "fused" else None
        if problem is not None:
            return False, problem
        got, want = value_and_grads(fns[name], params), value_and_grads(fns["torch"], params)
        value_err = max_rel_err(got[0], want[0])
        grad_err = max(max_rel_err(g, w) for g, w in zip(got[1:], want[1:], strict=True))
        return (
            value_err <= TOL and grad_err <= TOL,
            f"value {value_err:.1e}, grads {grad_err:.1e} (tol {TOL:g})",
        )

    for name, fn in fns.items():
        harness.print_op_counts(name, step(fn), kernels="orth_defect", warm=True)
    for p in params:
        p.grad = None
    return Case(
        {name: step(fn) for name, fn in fns.items()},
        {"op": OP, "mode": MODE, "r": m["r"], "dtype": "float32"},
        baseline="peft",
        check=check,
        checked=("fused", "peft"),
        reference="torch",
        title=f"{OP} {MODE}: {m}, fp32, {len(params) // 2} adapted layers",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, PROVIDERS, iters=(30, 5))
    return harness.parse_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = harness.GPU_ADAPTERS if device == "cuda" else harness.CPU_ADAPTERS
    return harness.run(
        args,
        [m],
        lambda m: setup(m, args.providers, device),
        title=f"{OP} benchmark ({MODE})",
        device=device,
        csv_names=("gpu_orth_reg.csv", "cpu_orth_reg.csv"),
    )


@pytest.fixture(scope="module")
def cpu_case() -> Case:
    return setup(harness.CPU_ADAPTERS, PROVIDERS, "cpu")


@pytest.mark.parametrize("provider", ["torch", "peft"])
def test_orth_reg_cpu(benchmark: Any, cpu_case: Case, provider: str) -> None:
    harness.pytest_benchmark(benchmark, cpu_case, provider)


if __name__ == "__main__":
    sys.exit(main())
