"""Benchmark of the adapted linear layer: fused Triton kernels vs torch vs PEFT vs the frozen base.

Providers, all on one frozen base ``nn.Linear`` (bias=False) and one set of adapter values:
``base`` (the frozen layer alone, the floor; rows have ``r`` empty), ``fused``
(``adalora_fast.SVDLinear``, backend "triton"), ``torch`` (the same, backend "torch") and ``peft``
(PEFT 0.21's ``peft.tuners.adalora.layer.SVDLinear``, lora_dropout 0) and ``peft_lora`` (PEFT's LoRA
``Linear`` at the same rank: timed, not checked), ``fused_fold`` (``fused`` with
``ADALORA_FAST_FOLD_DLAMBDA``: d(lambda) reduced in the dQ kernel, opt-in until this benchmark shows
it faster), ``fused_tma`` (``fused`` with ``ADALORA_FAST_TMA_GEMM``: y and dx on the persistent TMA
GEMM, opt-in likewise), ``fused_cublas`` (``ADALORA_FAST_CUBLAS_GEMM``: cuBLAS GEMMs, the low-rank
term added into their outputs, opt-in likewise); on CUDA with ``--providers ... fused_graphed``
also ``fused_graphed`` and ``base_graphed`` (the layer and the frozen base captured by
``torch.cuda.make_graphed_callables``: static shapes, no host work per call). Adapters are fp32 with random
non-zero A, E, B (the adapter term about as large as the base's output); x is (tokens, d_in) and
requires grad. Modes (``harness.MODES``): ``fwd`` (forward with autograd recording), ``bwd``
(backward alone), ``fwd+bwd``; every gradient is set to None before each call. The check, before
timing: ``fused`` (on CUDA it must run the compiled kernels) and ``peft`` give y and every gradient
within a dtype tolerance of ``torch`` (max |diff| / max |ref| per tensor). On CUDA each row also has
``host_us`` (the enqueue time of one call on an idle device) and ``device_us`` (its kernels' summed
time, torch.profiler): a row whose host_us exceeds its device_us is host-bound.

On CUDA: the Llama-7B grid (4096->4096, 4096->11008, 11008->4096; tokens 2048 / 8192 / 16384; r 8 /
12 / 32 / 64), bf16 base, rows in ``<out>/gpu_svd_linear.csv``; ``--quick`` is the goal point alone
(4096->4096, 8192 tokens, r 12: fused fwd+bwd <= +10% over the base's fwd+bwd). On the CPU:
``base``, ``torch``, ``peft`` at 512->512, 256 tokens, r 12, fp32, rows in ``cpu_svd_linear.csv``
(the fused kernels would run in Triton's interpreter there: no performance figure).

    python benchmarks/bench_svd_linear.py [--out DIR] [--quick] [--providers base fused torch peft peft_lora]
    pytest benchmarks/bench_svd_linear.py --benchmark-only     # the CPU shape, with pytest-benchmark
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from typing import Any

import harness
import pytest
import torch
from harness import MODES, Case, frozen_linear, layer_inputs, layer_step
from torch import nn

from adalora_fast.testing import max_rel_err

OP = "svd_linear"
PROVIDERS = ("base", "fused", "fused_fold", "fused_tma", "fused_cublas", "torch", "peft", "peft_lora",
             "fused_graphed", "base_graphed")  # fmt: skip
BACKENDS = {"fused": "triton", "fused_fold": "triton", "fused_tma": "triton", "fused_cublas": "triton",
            "torch": "torch"}  # fmt: skip
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
GPU_TOKENS, GPU_RANKS = (2048, 8192, 16384), (8, 12, 32, 64)
GOAL = {"d_in": 4096, "d_out": 4096, "tokens": 8192, "r": 12}
GOAL_PCT = 10.0
CPU_CONFIG = (512, 512, 256, (12,))
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
SEED = 0


def make_ours(base: nn.Linear, r: int, backend: str) -> nn.Module:
    """``adalora_fast.SVDLinear`` on ``base``: A ~ N(0, 1/d_in), E ~ N(0, 1), B ~ N(0, 1/r),
    lora_alpha = r (scale ~1), drawn on the CPU so that every device gets the same values."""
    from adalora_fast import SVDLinear

    layer = SVDLinear(base, r=r, lora_alpha=float(r), lora_dropout=0.0, backend=backend)
    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for p, std in ((layer.lora_A, base.in_features**-0.5), (layer.lora_E, 1.0), (layer.lora_B, r**-0.5)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return layer.train()


def make_peft(base: nn.Linear, ours: nn.Module) -> nn.Module:
    """PEFT's AdaLoRA ``SVDLinear`` on ``base`` with ``ours``' adapter values; only lora_* train, as
    after ``get_peft_model`` (moving the adapter re-wraps ranknum as a trainable Parameter)."""
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import SVDLinear as PeftSVDLinear

    r, alpha = ours.lora_A.shape[0], ours.lora_alpha
    cfg = AdaLoraConfig(
        init_r=r, target_r=r, lora_alpha=alpha, lora_dropout=0.0, total_step=1000, target_modules=["base"]
    )
    layer = PeftSVDLinear(base, "default", config=cfg, r=r, lora_alpha=alpha)
    for name in ("lora_A", "lora_E", "lora_B"):
        getattr(layer, name)["default"] = nn.Parameter(getattr(ours, name).detach().clone())
    for name, p in layer.named_parameters():
        p.requires_grad_(name.startswith("lora_"))
    return layer.train()


def make_peft_lora(base: nn.Linear, r: int) -> nn.Module:
    """PEFT's LoRA ``Linear`` at the same rank on ``base`` (B drawn non-zero, so the update is live):
    the cost of plain LoRA, which AdaLoRA's SVD form and rank masks add to. Timed, not checked (it
    computes another function)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["base"])
    layer = PeftLoraLinear(base, "default", config=cfg, r=r, lora_alpha=r, lora_dropout=0.0)
    g = torch.Generator().manual_seed(SEED + 3)
    with torch.no_grad():
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g).to(b) * r**-0.5)
    for name, p in layer.named_parameters():
        p.requires_grad_(name.startswith("lora_"))
    return layer.train()


def outputs_and_grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """``y`` and the gradients of x and of lora_A / lora_E / lora_B after ``layer(x).backward(dy)``."""
    xx = x.detach().clone().requires_grad_(True)
    params = {n.split(".")[0]: p for n, p in layer.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    with torch.enable_grad():
        y = layer(xx)
        y.backward(dy)
    out = {"y": y.detach(), "dx": xx.grad}
    for name, p in params.items():
        out[f"d{name.removeprefix('lora_')}"], p.grad = p.grad, None
    return out


def fused_problem(layer: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``layer`` (backend "triton") would not run the compiled fused kernels on ``x``, or None."""
    from adalora_fast import functional

    choice = functional.svd_linear_choice(x, layer.base_layer.weight, layer.lora_A, "triton")
    reason = None if choice.reason is None else f"the fused path falls back to torch: {choice.reason}"
    return harness.fused_problem(OP, x.device) or reason


@functools.lru_cache(maxsize=1)  # one block of inputs alive at a time
def inputs(d_in: int, d_out: int, tokens: int, device: str, dtype: torch.dtype) -> tuple:
    x, dy = layer_inputs(tokens, d_in, d_out, device, dtype, seed=SEED + 1)
    return frozen_linear(d_in, d_out, device, dtype, seed=SEED), x, dy


def graph(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    """``layer`` with its forward and backward captured as CUDA graphs
    (``torch.cuda.make_graphed_callables``; x's shape is then fixed): what static-shape training
    replays, with no Python, autograd or launch work per call."""
    return torch.cuda.make_graphed_callables(layer, (x.detach().clone().requires_grad_(True),))


def build(provider: str, base: nn.Linear, r: int, x: torch.Tensor | None = None) -> nn.Module:
    if provider == "fused_graphed":
        assert x is not None
        return graph(make_ours(base, r, "triton"), x)
    if provider == "peft":
        return make_peft(base, make_ours(base, r, "torch"))
    if provider == "peft_lora":
        return make_peft_lora(base, r)
    return make_ours(base, r, BACKENDS[provider])


def setup(config: tuple, providers: list[str], device: str, dtype: torch.dtype) -> Case:
    """One shape x tokens: ``base`` and, per rank, ``<provider> r<r>`` (``torch`` always built: the
    reference of the check)."""
    d_in, d_out, tokens, ranks = config
    base, x, dy = inputs(d_in, d_out, tokens, device, dtype)
    case = Case(
        {},
        {"op": OP, "d_in": d_in, "d_out": d_out, "tokens": tokens, "dtype": dtype},
        baseline="base",
        modes=MODES,
        fields={"base": {"r": None}},
        reference="torch",
        title=f"{OP} {d_in}->{d_out}, {tokens} tokens, {str(dtype)[6:]} base, fp32 adapters",
        host_device=True,
    )
    layers = {"base": base}
    graphed = device == "cuda" and "fused_graphed" in providers
    if graphed:  # the frozen layer captured too: graphed vs graphed, both without their host work
        layers.update(harness.build_each(["base_graphed"], lambda _k: graph(copy.deepcopy(base), x),
                                         case.failures))  # fmt: skip
        case.fields["base_graphed"] = {"r": None}
    for r in ranks:
        eager = ("fused", "fused_fold", "fused_tma", "fused_cublas", "torch", "peft", "peft_lora")
        wanted = harness.timed_here([p for p in eager if p == "torch" or p in providers], device)
        names = [f"{p} r{r}" for p in wanted] + ([f"fused_graphed r{r}"] if graphed else [])
        build_one = functools.partial(lambda key, r: build(key.split()[0], base, r, x), r=r)
        layers.update(harness.build_each(names, build_one, case.failures))
    for key in layers:
        if key not in ("base", "base_graphed"):
            case.fields[key] = {"provider": key.split()[0], "r": int(key.split()[1][1:])}
    case.checked = [k for k in layers if k.startswith(("fused", "peft "))]

    def step(key: str, layer: nn.Module, mode: str) -> Any:
        # The switch on around the forward (the "bwd" mode records it here, once) and every timed call.
        provider = key.split()[0]
        fn = layer_step(mode, harness.opted_in(provider, layer), x, dy, [x, *layer.parameters()])
        return harness.opted_in(provider, fn)

    case.providers = {key: functools.partial(step, key, layer) for key, layer in layers.items()}

    def check(key: str) -> tuple[bool, str]:
        ref = layers.get(f"torch {key.split()[1]}")
        if ref is None:
            return False, "no torch layer to check against"
        problem = fused_problem(layers[key], x) if key.startswith("fused") else None
        if problem is not None:
            return False, problem
        got = harness.opted_in(key.split()[0], outputs_and_grads)(layers[key], x, dy)
        want = outputs_and_grads(ref, x, dy)
        errs = {k: max_rel_err(got.get(k), v) for k, v in want.items()}
        desc = " ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (max rel, tol {TOL[dtype]:g})"
        return all(e <= TOL[dtype] for e in errs.values()), desc  # NaN compares False: a failure

    case.check = check
    return case


def goal_line(res: harness.Results) -> str:
    """The verdict on the goal point: fused fwd+bwd vs base fwd+bwd, <= +10%."""
    g = {"op": OP, "mode": "fwd+bwd", "d_in": GOAL["d_in"], "d_out": GOAL["d_out"], "tokens": GOAL["tokens"]}
    what = f"GOAL fused fwd+bwd {g['d_in']}->{g['d_out']} tokens {g['tokens']} r {GOAL['r']} vs base fwd+bwd"
    fused, base = res.get(provider="fused", r=GOAL["r"], **g), res.get(provider="base", **g)
    if fused is None or base is None:
        why = (
            "needs CUDA"
            if not torch.cuda.is_available()
            else "fused or base not measured (see failures above)"
        )
        return f"{what} (goal <= +{GOAL_PCT:.0f}%): NOT MEASURED ({why})"
    pct = harness.overhead_pct(fused, base)
    verdict = "MET" if pct <= GOAL_PCT else "NOT MET"
    return f"{what}: {fused:.3f} ms vs {base:.3f} ms = {pct:+.1f}% (goal <= +{GOAL_PCT:.0f}%): {verdict}"


def verdict_line(res: harness.Results, provider: str, reference: str = "fused", mode: str = "fwd+bwd") -> str:
    """``provider`` against ``reference`` at the goal point (an opt-in becomes the default only if
    faster), and against the base."""
    g = {"op": OP, "mode": mode, "d_in": GOAL["d_in"], "d_out": GOAL["d_out"], "tokens": GOAL["tokens"]}
    new = res.get(provider=provider, r=GOAL["r"], **g)
    ref = res.get(provider=reference, r=None if reference.startswith("base") else GOAL["r"], **g)
    base = res.get(provider="base", **g)
    what = f"{provider} {mode} vs {reference} {mode} at the goal point (r {GOAL['r']})"
    if new is None or ref is None:
        return f"{what}: NOT MEASURED (needs CUDA)"
    line = f"{what}: {new:.3f} ms vs {ref:.3f} ms = {harness.overhead_pct(new, ref):+.1f}%"
    return line if base is None else f"{line}; over the base {harness.overhead_pct(new, base):+.1f}%"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, PROVIDERS, iters=(50, 50))
    parser.add_argument(
        "--shapes",
        type=lambda s: [tuple(map(int, i.split("x"))) for i in s.split(",")],
        help="GPU shapes as d_inxd_out,... (e.g. 4096x11008)",
    )
    parser.add_argument("--tokens", type=_ints, help="GPU token counts, comma-separated")
    parser.add_argument("--ranks", type=_ints, help="GPU ranks, comma-separated")
    return harness.parse_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "fused_graphed" in args.providers and "base_graphed" not in args.providers:
        args.providers.append("base_graphed")  # graphed rows are compared with the graphed base
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        quick = args.quick
        shapes = args.shapes or ([(GOAL["d_in"], GOAL["d_out"])] if quick else list(GPU_SHAPES))
        tokens = args.tokens or ([GOAL["tokens"]] if quick else list(GPU_TOKENS))
        ranks = tuple(args.ranks or ([GOAL["r"]] if quick else list(GPU_RANKS)))
        configs = [(d_in, d_out, t, ranks) for d_in, d_out in shapes for t in tokens]
        intro = f"grid: shapes {shapes} tokens {tokens} r {list(ranks)}"
    else:
        configs, intro = [CPU_CONFIG], ""
    return harness.run(
        args,
        configs,
        lambda c: setup(c, args.providers, device, dtype),
        title=f"{OP} benchmark",
        device=device,
        csv_names=("gpu_svd_linear.csv", "cpu_svd_linear.csv"),
        goals=lambda res: [
            goal_line(res),
            verdict_line(res, "fused_fold", mode="bwd"),  # the fold changes the backward only
            verdict_line(res, "fused_tma"),
            verdict_line(res, "fused_cublas"),
            verdict_line(res, "fused_graphed", reference="base_graphed"),
        ],
        intro=intro,
    )


@pytest.fixture(scope="module")
def cpu_case() -> Case:
    pytest.importorskip("peft")
    return setup(CPU_CONFIG, list(PROVIDERS), "cpu", torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["base", "torch r12", "peft r12", "peft_lora r12"])
def test_svd_linear_cpu(benchmark: Any, cpu_case: Case, key: str, mode: str) -> None:
    harness.pytest_benchmark(benchmark, cpu_case, key, mode, rounds=20, warmup=3)


if __name__ == "__main__":
    sys.exit(main())
