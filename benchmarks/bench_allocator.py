"""Benchmark of ``update_and_allocate`` on a budget-phase mask step: Triton scorer vs torch scorer vs PEFT.

One call updates the importance EMAs of every A, E, B, takes the triplet scores and their k-th
smallest, and masks every E (``docs/numeric_contract.md`` §2 items 4-6). Adapters
(``harness.make_adapters``, no base weights): 32 layers x 7 projections, d 4096 / MLP 11008 on CUDA,
d 512 / 1376 on the CPU, init_r 12 -> target_r 8, fp32; gradients N(0, 1), the same tensors for all.
Providers (each on its own copy of the values): ``fused`` (our ``RankAllocator``, backend "triton";
CUDA only), ``torch`` (backend "torch") and ``peft`` (PEFT 0.21's ``RankAllocator`` as its model calls
it in the budget phase), on adapter-only stand-ins (:class:`AdapterStub`, :class:`PeftAdapterStub`).
Schedule tinit = tfinal = 0, total_step 1000; every call is ``update_and_allocate(500)``. Before
timing, steps 498-500 (499-500 with ``--quick``) run on all, then one counted call; the check:
``fused`` and ``peft`` have ``torch``'s EMAs (max rel <= 1e-6), kept pattern and masked E. Goal:
``fused`` >= 100x ``peft`` on CUDA, ``torch`` >= 3x on the CPU. Rows: op ``update_and_allocate``, mode
``mask_step``, r 12, in ``<out>/gpu_allocator.csv`` or ``cpu_allocator.csv``.

    python benchmarks/bench_allocator.py [--out DIR] [--quick] [--providers fused torch peft] [--no-csv]
    pytest benchmarks/bench_allocator.py --benchmark-only     # the CPU model, with pytest-benchmark
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import harness
import pytest
import torch
from harness import LLAMA_PROJ, PEFT_ADAPTER, Case
from torch import nn

from adalora_fast.testing import max_rel_err

OP, MODE = "update_and_allocate", "mask_step"
PROVIDERS = ("fused", "torch", "peft")
BACKENDS = {"fused": "triton", "torch": "torch"}
TARGET_R = 8
SCHEDULE = {"tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 1000}
STEP = 500
CHECK_STEPS, QUICK_CHECK_STEPS = (STEP - 2, STEP - 1, STEP), (STEP - 1, STEP)
GOAL = {"cuda": ("fused", 100.0), "cpu": ("torch", 3.0)}  # provider that must be >= x times faster than peft
EMA_TOL = 1e-6
KINDS, TAGS = ("lora_A", "lora_E", "lora_B"), ("ema_ipt", "ema_unc")
SEED = 0


def initial_values(layers: int, d: int, d_ff: int, r: int, device: str | torch.device) -> dict:
    """``{module: {kind: tensor}}`` of the adapters, modules ``model.layers.<i>.<block>.<proj>``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in harness.make_adapters(layers, d, d_ff, r, device, seed=SEED):
        module, kind, _adapter = name.removeprefix("base_model.model.").rsplit(".", 2)
        out.setdefault(module, {})[kind] = p.detach()
    return out


class AdapterStub(nn.Module):
    """What our allocator reads of an adapted layer: lora_A / lora_E / lora_B, in_ and out_features."""

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for kind in KINDS:
            setattr(self, kind, nn.Parameter(values[kind].clone()))
        self.r = self.init_r = self.lora_A.shape[0]
        self.in_features, self.out_features = self.lora_A.shape[1], self.lora_B.shape[0]


class PeftAdapterStub(nn.Module):
    """What PEFT's RankAllocator reads of an ``AdaLoraLayer``: ``lora_A.<adapter>``, ``lora_B``,
    ``lora_E`` (ParameterDicts, PEFT's order) and the frozen ``ranknum.<adapter>``."""

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for kind in ("lora_A", "lora_B", "lora_E"):
            setattr(self, kind, nn.ParameterDict({PEFT_ADAPTER: nn.Parameter(values[kind].clone())}))
        ranknum = torch.full((1,), float(values["lora_A"].shape[0]), device=values["lora_A"].device)
        self.ranknum = nn.ParameterDict({PEFT_ADAPTER: nn.Parameter(ranknum, requires_grad=False)})


class Ours:
    """Our ``RankAllocator`` (backend "triton" or "torch") on :class:`AdapterStub` layers."""

    def __init__(self, backend: str, init: Mapping[str, Mapping[str, torch.Tensor]], target_r: int) -> None:
        import adalora_fast as af
        from adalora_fast.allocator import RankAllocator

        self.modules = {name: AdapterStub(values) for name, values in init.items()}
        r = next(iter(self.modules.values())).r
        config = af.AdaLoraConfig(init_r=r, target_r=target_r, backend=backend, **SCHEDULE)
        self.allocator = RankAllocator(list(self.modules.items()), config, backend=backend)

    def param(self, module: str, kind: str) -> nn.Parameter:
        return getattr(self.modules[module], kind)

    def __call__(self, step: int = STEP) -> None:
        # The same step again on purpose (a steady-state mask step): update_and_allocate refuses a
        # repeated step unless told so, as PEFT's counts it twice.
        self.allocator.reset_step()
        self.allocator.update_and_allocate(step)

    def emas(self) -> dict[tuple[str, str, str], torch.Tensor]:
        state = self.allocator.scorer.layer_state()
        return {(n, k, t): state[f"{n}.{k}.{t}"] for n in self.modules for k in KINDS for t in TAGS}

    def kept(self) -> dict[str, torch.Tensor]:
        return {n: k.reshape(-1).to(torch.bool) for n, k in self.allocator.keep_mask().items()}


class Peft:
    """PEFT 0.21's ``RankAllocator`` on a module tree of :class:`PeftAdapterStub` at the same names."""

    def __init__(self, init: Mapping[str, Mapping[str, torch.Tensor]], target_r: int) -> None:
        import peft
        from peft.tuners.adalora.layer import RankAllocator

        self.modules = {name: PeftAdapterStub(values) for name, values in init.items()}
        self.model = nn.Module()
        for name, module in self.modules.items():
            *path, leaf = name.split(".")
            parent = self.model
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, module)
        r = next(iter(init.values()))["lora_A"].shape[0]
        self.config = peft.AdaLoraConfig(init_r=r, target_r=target_r, target_modules=LLAMA_PROJ, **SCHEDULE)
        self.allocator = RankAllocator(self.model, self.config, PEFT_ADAPTER)

    def param(self, module: str, kind: str) -> nn.Parameter:
        return getattr(self.modules[module], kind)[PEFT_ADAPTER]

    def __call__(self, step: int = STEP) -> None:  # AdaLoraModel.update_and_allocate, budget phase
        _, rank_pattern = self.allocator.update_and_allocate(self.model, step)
        if rank_pattern:
            self.config.rank_pattern = rank_pattern

    def emas(self) -> dict[tuple[str, str, str], torch.Tensor]:
        bufs = {"ema_ipt": self.allocator.exp_avg_ipt, "ema_unc": self.allocator.exp_avg_unc}
        return {
            (n, k, t): bufs[t][f"{n}.{k}.{PEFT_ADAPTER}"] for n in self.modules for k in KINDS for t in TAGS
        }

    def kept(self) -> dict[str, torch.Tensor]:
        pattern = self.config.rank_pattern or {}
        return {
            n: torch.tensor(pattern[f"{n}.lora_E.{PEFT_ADAPTER}"], dtype=torch.bool) for n in self.modules
        }


def build(provider: str, init: Mapping, target_r: int) -> Ours | Peft:
    return Ours(BACKENDS[provider], init, target_r) if provider in BACKENDS else Peft(init, target_r)


def draw_grads(init: Mapping[str, Mapping[str, torch.Tensor]], gen: torch.Generator) -> dict:
    """Random N(0, 1) gradients ``{(module, kind): tensor}`` in each parameter's shape."""
    return {
        (n, k): torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
        for n, values in init.items()
        for k, t in values.items()
    }


def compare(candidate: Ours | Peft, reference: Ours | Peft) -> tuple[bool, str]:
    """(ok, description): EMAs within EMA_TOL (per tensor), identical kept patterns and E values."""
    got, want = candidate.emas(), reference.emas()
    ema_err = max(max_rel_err(got[key], want[key], zero_reference_ok=True) for key in want)
    kept_c, kept_r = candidate.kept(), reference.kept()
    same_kept = all(torch.equal(kept_c[n].cpu(), kept_r[n].cpu()) for n in reference.modules)
    same_E = all(
        torch.equal(candidate.param(n, "lora_E").detach(), reference.param(n, "lora_E").detach())
        for n in reference.modules
    )
    kept, total = sum(int(k.sum()) for k in kept_r.values()), sum(k.numel() for k in kept_r.values())
    desc = (
        f"EMAs {ema_err:.1e} (tol {EMA_TOL:g}), kept pattern {'identical' if same_kept else 'DIFFERS'} "
        f"({kept} of {total} ranks kept), E {'identical' if same_E else 'DIFFERS'}"
    )
    return ema_err <= EMA_TOL and same_kept and same_E, desc  # NaN compares False: a failure


def setup(args: argparse.Namespace, device: str) -> Case:
    m = harness.GPU_ADAPTERS if device == "cuda" else harness.CPU_ADAPTERS
    init = initial_values(m["layers"], m["d"], m["d_ff"], m["r"], device)
    case = Case(
        {},
        {"op": OP, "mode": MODE, "r": m["r"], "dtype": "float32"},
        baseline="peft",
        reference="torch",
        checked=("fused", "peft"),
        title=describe(m, args.target_r),
    )
    names = ["torch", "peft", *harness.timed_here(args.providers, device)]
    built = harness.build_each(
        [p for p in PROVIDERS if p in names], lambda p: build(p, init, args.target_r), case.failures
    )
    gen = torch.Generator(device=device).manual_seed(SEED + 1)
    for step in QUICK_CHECK_STEPS if args.quick else CHECK_STEPS:
        grads = draw_grads(init, gen)
        for p in built.values():
            for (module, kind), g in grads.items():
                p.param(module, kind).grad = g
            p(step)
    for name, p in built.items():  # one more call each, alike: the histories stay equal
        harness.print_op_counts(name, p, device == "cuda", kernels="importance_ema")
    case.providers = built

    def check(name: str) -> tuple[bool, str]:  # fused must run the compiled kernels, and agree
        problem = harness.fused_problem("allocator", device) if name == "fused" else None
        if name == "fused" and not problem and built[name].allocator.scorer.name != "triton":
            problem = f"the allocator runs the {built[name].allocator.scorer.name} scorer, not the Triton one"
        if problem or "torch" not in built:
            return False, problem or "no torch provider to compare with"
        return compare(built[name], built["torch"])

    case.check = check
    return case


def describe(m: Mapping[str, int], target_r: int) -> str:
    init_bgt, target_bgt = 7 * m["layers"] * m["r"], 7 * m["layers"] * target_r
    t0, t1 = SCHEDULE["tinit"], SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    budget = int((init_bgt - target_bgt) * (1 - (STEP - t0) / (t1 - t0)) ** 3 + target_bgt)
    return (
        f"{OP} {MODE}: {m['layers']} layers x 7 projections (d {m['d']}, MLP {m['d_ff']}), init_r {m['r']}, "
        f"target_r {target_r}, fp32; schedule {SCHEDULE}; every call is step {STEP}: budget {budget} of "
        f"{init_bgt} ranks (k = {init_bgt - budget} pruned)"
    )


def goal_line(res: harness.Results, device: str, target_r: int) -> str:
    provider, factor = GOAL[device]
    m = harness.GPU_ADAPTERS if device == "cuda" else harness.CPU_ADAPTERS
    what = (
        f"GOAL {OP} {MODE} {provider} vs peft on {device} ({m['layers']}x7, d {m['d']}/{m['d_ff']}, "
        f"r {m['r']} -> {target_r}, fp32)"
    )
    ours, peft = res.get(op=OP, provider=provider), res.get(op=OP, provider="peft")
    if ours is None or peft is None:
        return f"{what} (goal >= {factor:g}x): NOT MEASURED ({provider} or peft not timed; see failures)"
    verdict = "MET" if peft / ours >= factor else "NOT MET"
    speedup = f"peft {peft:.3f} ms / {provider} {ours:.3f} ms = {peft / ours:.1f}x"
    return f"{what}: {speedup} (goal >= {factor:g}x): {verdict}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, PROVIDERS, iters=(30, 5), min_samples=(5, 3))
    parser.add_argument("--target-r", type=int, default=TARGET_R, help="target rank (default: %(default)s)")
    args = harness.parse_args(parser, argv)
    if not 0 <= args.target_r < harness.CPU_ADAPTERS["r"]:
        parser.error(f"--target-r must lie in [0, {harness.CPU_ADAPTERS['r']})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return harness.run(
        args,
        [device],
        lambda d: setup(args, d),
        title=f"{OP} benchmark ({MODE})",
        device=device,
        csv_names=("gpu_allocator.csv", "cpu_allocator.csv"),
        goals=lambda res: [goal_line(res, device, args.target_r)],
    )


@pytest.mark.parametrize("provider", ["torch", "peft"])
def test_update_and_allocate_cpu(benchmark: Any, provider: str) -> None:
    pytest.importorskip("peft")
    case = setup(parse_args(["--quick", "--providers", provider]), "cpu")
    harness.pytest_benchmark(benchmark, case, provider)


if __name__ == "__main__":
    sys.exit(main())
