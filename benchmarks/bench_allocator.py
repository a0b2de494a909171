"""Benchmark of ``update_and_allocate`` on a budget-phase mask step: Triton scorer vs torch scorer vs PEFT.

One call scores every element of every A, E, B (the sensitivity and uncertainty EMAs,
``docs/numeric_contract.md`` §2 item 4), takes the triplet scores, the k-th smallest of them and masks
every E (items 5-6). Adapters: a Llama-7B-shaped set built without the base weights
(``harness.make_adapters``): 32 layers x 7 projections (q, k, v, o: 4096 -> 4096; gate, up: 4096 ->
11008; down: 11008 -> 4096), init_r 12, target_r 8, fp32, random non-zero values (A, B ~ N(0, 0.02), E ~
N(0, 1)); gradients N(0, 1) assigned to ``.grad``, one set per check step, the last set kept (fixed)
while timing. Every provider has its own copy of the same adapter values (masking writes E) and reads
the same gradient tensors:

* ``fused``: ``adalora_fast.allocator.RankAllocator`` with backend "triton" (``TritonScorer``: the
  ``importance_ema`` kernels, 3 launches for all EMAs and triplet scores whatever the number of
  layers; threshold and mask in torch);
* ``torch``: the same allocator with backend "torch" (``FlatScorer``: gradients and weights
  concatenated per kind, flat EMAs, per-shape-group means: an op count that does not grow with depth);
* ``peft``: PEFT 0.21's ``peft.tuners.adalora.layer.RankAllocator.update_and_allocate(model, step)``
  as ``AdaLoraModel.update_and_allocate`` calls it in the budget phase (and then stores the returned
  rank pattern in the config), walking ``model.named_parameters()`` for ``lora_*.default``.

The layers are adapter-only stand-ins: adalora_fast's allocator reads ``lora_A`` / ``lora_E`` /
``lora_B``, ``in_features`` and ``out_features`` of each adapted layer (:class:`AdapterStub`, no base
layer, no forward); PEFT's walks a module tree whose parameters are named as in a PEFT model
(:class:`PeftAdapterStub`: ``<module>.lora_A.default``, ``lora_B``, ``lora_E``, frozen ``ranknum``,
in PEFT's registration order). A real PEFT model's walk also passes the base weights (string tests
only), so PEFT does slightly less work here than in training.

Schedule: tinit 0, tfinal 0, deltaT 1, total_step 1000: every step 1..999 is a mask step of the budget
phase (step > tinit, step < total_step - tfinal, step % deltaT == 0). Every timed call is
``update_and_allocate(500)``: the same step number each time, which both allocators accept (the budget
is a function of the step alone, nothing requires increasing steps), so every call updates the EMAs
and masks to the budget of step 500, however many calls a timer makes; the allocator never leaves
the budget phase.

Correctness gate, before any timing: steps 498, 499, 500 (fresh gradients each; 499, 500 with
``--quick``) on every provider, then ``fused`` and ``peft`` are compared with ``torch``: the EMAs of
every A, E, B (max |diff| / max |ref| per tensor <= 1e-6), the kept pattern (identical) and E after
masking (identical). A provider that fails or disagrees is reported and not timed. The ATen ops
(views excluded) of one call of each provider are printed, with the Triton launches of ``fused``
and, on CUDA, the GPU kernels of one call (``torch.profiler``).

On CUDA: timed with ``triton.testing.do_bench`` (median; ``rep`` raised for a slow provider so that
it gets at least 5 timed calls, 3 with ``--quick``), rows appended to ``<out>/gpu_allocator.csv``
after each provider; goal: ``fused``
>= 100x faster than ``peft``. On the CPU: ``torch`` and ``peft`` on 32 layers x 7 projections at
d = 512 with a 512 -> 1376 -> 512 MLP (gate, up 512 -> 1376; down 1376 -> 512; the attention
projections 512 -> 512), init_r 12, timed round-robin (``harness.time_cpu_interleaved``), appended to
``<out>/cpu_allocator.csv``; goal: ``torch`` >= 3x faster than ``peft``. ``fused`` is left out on
the CPU (Triton's interpreter is no performance figure). CSV columns are ``harness.COLUMNS`` (op
``update_and_allocate``, mode ``mask_step``, d_in / d_out / tokens empty, r = init_r, dtype float32).
``--quick`` runs the same model with fewer check steps and timed calls (CPU: 5 rounds).

    python benchmarks/bench_allocator.py [--out DIR] [--quick] [--providers fused torch peft] [--no-csv]
    pytest benchmarks/bench_allocator.py            # the CPU model, with pytest-benchmark
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    CPU_ADAPTERS,
    GPU_ADAPTERS,
    LLAMA_PROJ,
    PEFT_ADAPTER,
    add_common_args,
    append_rows,
    describe_environment,
    force_compiled_triton,
    free_memory,
    gpu_median_ms,
    make_adapters,
    op_counts,
    script_end,
    script_start,
    time_cpu_interleaved,
)
from torch import nn

OP = "update_and_allocate"
MODE = "mask_step"
PROVIDERS = ("fused", "torch", "peft")
CPU_PROVIDERS = ("torch", "peft")
REFERENCE = "torch"
BACKENDS = {"fused": "triton", "torch": "torch"}
GPU_MODEL = GPU_ADAPTERS
CPU_MODEL = CPU_ADAPTERS
TARGET_R = 8
GPU_CSV, CPU_CSV = "gpu_allocator.csv", "cpu_allocator.csv"
# Every step in 1..TOTAL_STEP - 1 is a mask step of the budget phase; every timed call uses STEP.
SCHEDULE = {"tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 1000}
STEP = 500
CHECK_STEPS, QUICK_CHECK_STEPS = (STEP - 2, STEP - 1, STEP), (STEP - 1, STEP)
GOAL = {"cuda": ("fused", 100.0), "cpu": ("torch", 3.0)}  # provider that must be >= x times faster than peft
EMA_TOL = 1e-6
KINDS = ("lora_A", "lora_E", "lora_B")
TAGS = ("ema_ipt", "ema_unc")
SEED = 0


# ---- adapters -----------------------------------------------------------------------------------
def initial_values(
    layers: int, d: int, d_ff: int, r: int, device: str | torch.device
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {kind: tensor}}`` of the adapters (``harness.make_adapters``), modules in model order.

    Module names drop PEFT's ``base_model.model.`` prefix: ``model.layers.<i>.<block>.<proj>``.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in make_adapters(layers, d, d_ff, r, device, seed=SEED):
        module, kind, _adapter = name.removeprefix("base_model.model.").rsplit(".", 2)
        out.setdefault(module, {})[kind] = p.detach()
    return out


class AdapterStub(nn.Module):
    """What adalora_fast's allocator reads of an adapted layer (``SVDLinear``): ``lora_A`` (r x d_in),
    ``lora_E`` (r x 1), ``lora_B`` (d_out x r), ``in_features``, ``out_features``, ``r``, ``init_r``.
    No base layer and no forward."""

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for kind in KINDS:
            setattr(self, kind, nn.Parameter(values[kind].clone()))
        self.r = self.init_r = self.lora_A.shape[0]
        self.in_features = self.lora_A.shape[1]
        self.out_features = self.lora_B.shape[0]


class PeftAdapterStub(nn.Module):
    """What PEFT's RankAllocator reads of an ``AdaLoraLayer``: its named parameters
    ``lora_A.<adapter>``, ``lora_B.<adapter>``, ``lora_E.<adapter>`` (ParameterDicts, in the order
    a PEFT model lists them) and the frozen ``ranknum.<adapter>``. No base layer and no forward."""

    def __init__(self, values: Mapping[str, torch.Tensor], adapter: str = PEFT_ADAPTER) -> None:
        super().__init__()
        for kind in ("lora_A", "lora_B", "lora_E"):
            setattr(self, kind, nn.ParameterDict({adapter: nn.Parameter(values[kind].clone())}))
        r = values["lora_A"].shape[0]
        ranknum = torch.full((1,), float(r), device=values["lora_A"].device)
        self.ranknum = nn.ParameterDict({adapter: nn.Parameter(ranknum, requires_grad=False)})


def module_tree(modules: Mapping[str, nn.Module]) -> nn.Module:
    """A root module holding ``modules`` at their dotted names (plain ``nn.Module`` containers between)."""
    root = nn.Module()
    for name, module in modules.items():
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, module)
    return root


# ---- providers ----------------------------------------------------------------------------------
class Ours:
    """adalora_fast's ``RankAllocator`` (backend "triton" or "torch") on :class:`AdapterStub` layers."""

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
        self.allocator.update_and_allocate(step)

    def emas(self) -> dict[tuple[str, str, str], torch.Tensor]:
        state = self.allocator.scorer.layer_state()
        return {(n, k, t): state[f"{n}.{k}.{t}"] for n in self.modules for k in KINDS for t in TAGS}

    def kept(self) -> dict[str, torch.Tensor]:
        return {n: k.reshape(-1).to(torch.bool) for n, k in self.allocator.keep_mask().items()}


class Peft:
    """PEFT 0.21's ``RankAllocator`` on a :class:`PeftAdapterStub` module tree."""

    def __init__(self, init: Mapping[str, Mapping[str, torch.Tensor]], target_r: int) -> None:
        import peft
        from peft.tuners.adalora.layer import RankAllocator

        self.modules = {name: PeftAdapterStub(values) for name, values in init.items()}
        self.model = module_tree(self.modules)
        r = next(iter(init.values()))["lora_A"].shape[0]
        self.config = peft.AdaLoraConfig(
            init_r=r, target_r=target_r, target_modules=list(LLAMA_PROJ), **SCHEDULE
        )
        self.allocator = RankAllocator(self.model, self.config, PEFT_ADAPTER)

    def param(self, module: str, kind: str) -> nn.Parameter:
        return getattr(self.modules[module], kind)[PEFT_ADAPTER]

    def __call__(self, step: int = STEP) -> None:
        # AdaLoraModel.update_and_allocate(step) for step < total_step - tfinal (peft/tuners/adalora/model.py)
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


Provider = Ours | Peft


def build(provider: str, init: Mapping[str, Mapping[str, torch.Tensor]], target_r: int) -> Provider:
    if provider in BACKENDS:
        return Ours(BACKENDS[provider], init, target_r)
    if provider == "peft":
        return Peft(init, target_r)
    raise ValueError(f"unknown provider {provider!r}")


def fused_problem(p: Provider) -> str | None:
    """Why ``fused`` would not run the compiled kernels (it must not be reported), or None."""
    from adalora_fast import backend

    device = next(iter(p.modules.values())).lora_A.device
    if backend.resolve("allocator", "triton", device) != "triton":
        return backend.explain("allocator", "triton", device)
    if backend.interpreting():
        return "the kernels run in Triton's interpreter (TRITON_INTERPRET set before import)"
    if p.allocator.scorer.name != "triton":
        return f"the allocator runs the {p.allocator.scorer.name} scorer, not the Triton one"
    return None


def draw_grads(
    init: Mapping[str, Mapping[str, torch.Tensor]], gen: torch.Generator
) -> dict[tuple[str, str], torch.Tensor]:
    """Random N(0, 1) gradients ``{(module, kind): tensor}`` in each parameter's shape."""
    return {
        (n, k): torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
        for n, values in init.items()
        for k, t in values.items()
    }


def set_grads(providers: Mapping[str, Provider], grads: Mapping[tuple[str, str], torch.Tensor]) -> None:
    """The same gradient tensors as ``.grad`` of every provider's parameters (read only by allocators)."""
    for p in providers.values():
        for (module, kind), g in grads.items():
            p.param(module, kind).grad = g


# ---- correctness and op counts ------------------------------------------------------------------
def compare(candidate: Provider, reference: Provider) -> tuple[bool, str]:
    """(ok, description): EMAs within EMA_TOL (per tensor), identical kept patterns and E values."""
    got, want = candidate.emas(), reference.emas()
    errs = []
    for tag in TAGS:
        for kind in KINDS:
            per_tensor = [
                (got[n, kind, tag].float() - want[n, kind, tag].float()).abs().max()
                / want[n, kind, tag].float().abs().max().clamp_min(1e-30)
                for n in reference.modules
            ]
            errs.append(torch.stack(per_tensor).max())
    ema_err = torch.stack(errs).max().item()
    kept_c, kept_r = candidate.kept(), reference.kept()
    same_kept = all(torch.equal(kept_c[n].cpu(), kept_r[n].cpu()) for n in reference.modules)
    same_E = all(
        torch.equal(candidate.param(n, "lora_E").detach(), reference.param(n, "lora_E").detach())
        for n in reference.modules
    )
    kept = sum(int(k.sum()) for k in kept_r.values())
    total = sum(k.numel() for k in kept_r.values())
    ok = ema_err <= EMA_TOL and same_kept and same_E  # NaN compares False: a failure
    desc = (
        f"EMAs {ema_err:.1e} (tol {EMA_TOL:g}), kept pattern {'identical' if same_kept else 'DIFFERS'} "
        f"({kept} of {total} ranks kept), E {'identical' if same_E else 'DIFFERS'}"
    )
    return ok, desc


@contextmanager
def counting_triton_launches() -> Iterator[Counter[str]]:
    """Counts the launches of the ``importance_ema`` kernels (its ``*_kernel`` globals, wrapped while
    the context is open; the scorer looks them up at each launch)."""
    counts: Counter[str] = Counter()
    mod = sys.modules.get("adalora_fast.kernels.importance_ema")
    if mod is None:
        yield counts
        return

    class Counting:
        def __init__(self, kernel: Any, name: str) -> None:
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid: Any) -> Any:
            counts[self.name] += 1
            return self.kernel[grid]

    originals = {n: k for n, k in vars(mod).items() if n.endswith("_kernel") and hasattr(k, "__getitem__")}
    try:
        for name, kernel in originals.items():
            setattr(mod, name, Counting(kernel, name))
        yield counts
    finally:
        for name, kernel in originals.items():
            setattr(mod, name, kernel)


def print_op_counts(provider: str, p: Provider, cuda: bool) -> None:
    with counting_triton_launches() as launches:
        aten, kernels = op_counts(p, cuda=cuda)
    gpu = "" if kernels is None else f", {kernels} GPU kernels"
    print(
        f"ops {provider}: {aten} ATen ops (views excluded) + {sum(launches.values())} Triton launches{gpu} "
        "per call",
        flush=True,
    )


def checked_providers(
    init: Mapping[str, Mapping[str, torch.Tensor]],
    providers: Sequence[str],
    target_r: int,
    check_steps: Sequence[int],
    failures: list[str],
    cuda: bool,
) -> dict[str, Provider]:
    """Build every provider (and the reference), run ``check_steps`` on all of them with the same
    gradients, and return those that match the reference; the last gradients stay assigned."""

    def fail(provider: str, what: str, err: BaseException | str) -> None:
        msg = f"{provider}: {what}: {err if isinstance(err, str) else f'{type(err).__name__}: {err}'}"
        failures.append(msg)
        print(f"FAILED {msg}", file=sys.stderr, flush=True)
        if isinstance(err, BaseException):
            traceback.print_exc()

    built: dict[str, Provider] = {}
    for provider in dict.fromkeys([REFERENCE, *providers]):
        try:
            built[provider] = build(provider, init, target_r)
            if provider == "fused":
                problem = fused_problem(built[provider])
                if problem is not None:
                    del built[provider]
                    fail(provider, "not timed", problem)
        except Exception as err:
            built.pop(provider, None)
            fail(provider, "build", err)
    gen = torch.Generator(device=next(iter(next(iter(init.values())).values())).device).manual_seed(SEED + 1)
    for step in check_steps:
        set_grads(built, draw_grads(init, gen))
        for provider in list(built):
            try:
                built[provider](step)
            except Exception as err:
                del built[provider]
                fail(provider, f"update_and_allocate({step})", err)
    if REFERENCE not in built:
        for provider in [p for p in built if p != REFERENCE]:
            fail(provider, "not checked", f"the reference {REFERENCE!r} failed")
        return {}
    agree = {REFERENCE}
    for provider, p in built.items():  # every comparison first: counting the ops runs one more step
        if provider == REFERENCE:
            continue
        try:
            ok, desc = compare(p, built[REFERENCE])
            print(f"check {provider} vs {REFERENCE} after steps {list(check_steps)}: {desc}: "
                  f"{'OK' if ok else 'FAILED'}", flush=True)  # fmt: skip
            if ok:
                agree.add(provider)
            else:
                fail(provider, "check", desc)
        except Exception as err:
            fail(provider, "check", err)
    for provider in [p for p in built if p in agree]:
        try:
            print_op_counts(provider, built[provider], cuda)
        except Exception as err:  # the counts are information, not a gate
            print(f"ops {provider}: not counted ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
    checked = {p: built[p] for p in providers if p in agree and p in built}
    return checked


# ---- runs ---------------------------------------------------------------------------------------
def row(provider: str, r: int, ms: float) -> dict[str, Any]:
    return {"op": OP, "mode": MODE, "provider": provider, "r": r, "dtype": "float32", "median_ms": ms}


def describe_model(m: Mapping[str, int], target_r: int) -> str:
    init_bgt = 7 * m["layers"] * m["r"]
    target_bgt = 7 * m["layers"] * target_r
    t0, t1 = SCHEDULE["tinit"], SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    budget = int((init_bgt - target_bgt) * (1 - (STEP - t0) / (t1 - t0)) ** 3 + target_bgt)
    return (
        f"{m['layers']} layers x 7 projections (d {m['d']}, MLP {m['d']} -> {m['d_ff']} -> {m['d']}), "
        f"init_r {m['r']}, target_r {target_r}, fp32; schedule {SCHEDULE}; every call is step {STEP}: "
        f"budget {budget} of {init_bgt} ranks (k = {init_bgt - budget} pruned)"
    )


def summary(ms: Mapping[str, float]) -> None:
    print(f"\n| provider | {MODE} ms | vs peft |\n|---|---:|---:|")
    for provider, t in ms.items():
        speedup = f"{ms['peft'] / t:.1f}x" if "peft" in ms else "-"
        print(f"| {provider} | {t:.3f} | {speedup} |")


def goal_line(device: str, ms: Mapping[str, float], m: Mapping[str, int], target_r: int) -> str:
    """The one-line verdict: GOAL[device]'s provider >= the factor times faster than peft."""
    provider, factor = GOAL[device]
    what = (
        f"GOAL {OP} {MODE} {provider} vs peft on {device} ({m['layers']}x7, d {m['d']}/{m['d_ff']}, "
        f"r {m['r']} -> {target_r}, fp32)"
    )
    if provider not in ms or "peft" not in ms:
        return f"{what} (goal >= {factor:g}x): NOT MEASURED ({provider} or peft not timed; see failures)"
    speedup = ms["peft"] / ms[provider]
    verdict = "MET" if speedup >= factor else "NOT MET"
    return (
        f"{what}: peft {ms['peft']:.3f} ms / {provider} {ms[provider]:.3f} ms = {speedup:.1f}x "
        f"(goal >= {factor:g}x): {verdict}"
    )


def run_gpu(
    args: argparse.Namespace, csv_path: Path | None, ms: dict[str, float], failures: list[str]
) -> None:
    m = GPU_MODEL
    init = initial_values(m["layers"], m["d"], m["d_ff"], m["r"], "cuda")
    numel = sum(t.numel() for values in init.values() for t in values.values())
    print(f"adapters: {len(init)} adapted layers, {numel / 1e6:.1f}M elements\n", flush=True)
    check_steps = QUICK_CHECK_STEPS if args.quick else CHECK_STEPS
    steps = checked_providers(init, args.providers, args.target_r, check_steps, failures, cuda=True)
    del init
    min_samples = 3 if args.quick else 5
    for provider, step in steps.items():
        try:
            ms[provider] = gpu_median_ms(step, warmup=args.warmup, rep=args.rep, min_samples=min_samples)
            print(f"  {provider:5s} {MODE} {ms[provider]:9.3f} ms", flush=True)
            if csv_path is not None:
                append_rows(csv_path, [row(provider, m["r"], ms[provider])])
        except Exception as err:
            failures.append(f"{provider} timing: {type(err).__name__}: {err}")
            print(f"FAILED {provider} timing: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            traceback.print_exc()
        free_memory()
    summary(ms)


def _quartiles(ts: Sequence[float]) -> tuple[float, float]:
    if len(ts) < 2:
        return ts[0], ts[0]
    q = statistics.quantiles(ts, n=4)
    return q[0], q[2]


def run_cpu(
    args: argparse.Namespace, csv_path: Path | None, ms: dict[str, float], failures: list[str]
) -> None:
    skipped = [p for p in args.providers if p not in CPU_PROVIDERS]
    if skipped:
        print(f"note: {skipped} skipped on the CPU (the fused kernels would run in Triton's interpreter)")
    m = CPU_MODEL
    init = initial_values(m["layers"], m["d"], m["d_ff"], m["r"], "cpu")
    check_steps = QUICK_CHECK_STEPS if args.quick else CHECK_STEPS
    providers = [p for p in CPU_PROVIDERS if p in args.providers]
    steps = checked_providers(init, providers, args.target_r, check_steps, failures, cuda=False)
    if not steps:
        return
    load_before = os.getloadavg()
    times = time_cpu_interleaved(steps, warmup=3, iters=args.iters)
    load_after = os.getloadavg()
    print(
        f"\n{args.iters} round-robin rounds; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)} "
        f"on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    for provider, ts in times.items():
        ms[provider] = statistics.median(ts)
        q1, q3 = _quartiles(ts)
        print(
            f"  {provider:5s} {MODE} median {ms[provider]:9.3f} ms  min {min(ts):9.3f}  "
            f"quartiles {q1:9.3f} .. {q3:9.3f}  max {max(ts):9.3f}"
        )
    if "torch" in times and "peft" in times:
        ratios = [p / t for p, t in zip(times["peft"], times["torch"], strict=True)]
        q1, q3 = _quartiles(ratios)
        print(
            f"  peft/torch per round: median {statistics.median(ratios):.2f}x, quartiles {q1:.2f}x .. "
            f"{q3:.2f}x, range {min(ratios):.2f}x .. {max(ratios):.2f}x; ratio of minima "
            f"{min(times['peft']) / min(times['torch']):.2f}x"
        )
    if csv_path is not None:
        append_rows(csv_path, [row(p, m["r"], t) for p, t in ms.items()])
    summary(ms)


# ---- pytest-benchmark (CPU model) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_init() -> dict[str, dict[str, torch.Tensor]]:
    m = CPU_MODEL
    return initial_values(m["layers"], m["d"], m["d_ff"], m["r"], "cpu")


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_update_and_allocate_cpu(benchmark: Any, cpu_init: Any, provider: str) -> None:
    if provider == "peft":
        pytest.importorskip("peft")
    m = CPU_MODEL
    p = build(provider, cpu_init, TARGET_R)
    set_grads({provider: p}, draw_grads(cpu_init, torch.Generator().manual_seed(SEED + 1)))
    p(STEP)  # the first call allocates the EMAs
    benchmark.group = f"{OP} {MODE} {m['layers']}x7 d {m['d']}/{m['d_ff']} r{m['r']}->{TARGET_R} fp32 (CPU)"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
    benchmark.pedantic(p, rounds=10, warmup_rounds=2, iterations=1)
    kept = sum(int(k.sum()) for k in p.kept().values())
    assert 0 < kept < m["layers"] * 7 * m["r"]


def test_peft_matches_torch_cpu(cpu_init: Any) -> None:
    pytest.importorskip("peft")
    failures: list[str] = []
    checked = checked_providers(
        cpu_init, ["torch", "peft"], TARGET_R, QUICK_CHECK_STEPS, failures, cuda=False
    )
    assert not failures, failures
    assert set(checked) == {"torch", "peft"}


# ---- script mode --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="fewer check steps and timed calls, same model")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--target-r", type=int, default=TARGET_R, help="target rank (default: %(default)s)")
    parser.add_argument("--iters", type=int, help="round-robin rounds (CPU; default 30, 5 with --quick)")
    args = parser.parse_args(argv)
    if args.iters is None:
        args.iters = 5 if args.quick else 30
    if not 0 <= args.target_r < CPU_MODEL["r"]:
        parser.error(f"--target-r must lie in [0, {CPU_MODEL['r']})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda, csv_path = script_start(args.out, args.no_csv, args.threads, GPU_CSV, CPU_CSV)
    print(f"# {OP} benchmark ({MODE})\n\n{describe_environment()}\n", flush=True)
    ms: dict[str, float] = {}
    failures: list[str] = []
    model = GPU_MODEL if cuda else CPU_MODEL
    try:
        if cuda:
            force_compiled_triton()
            print(f"GPU model: {describe_model(model, args.target_r)}")
            print(f"do_bench median (warmup {args.warmup} ms, rep {args.rep} ms)\n", flush=True)
            run_gpu(args, csv_path, ms, failures)
        else:
            print(f"no CUDA: CPU model: {describe_model(model, args.target_r)}\n", flush=True)
            run_cpu(args, csv_path, ms, failures)
    except Exception as err:  # outside the per-provider guards (e.g. a broken CUDA context)
        failures.append(f"unexpected {type(err).__name__}: {err}")
        print("\nABORTED by an unexpected error:", file=sys.stderr)
        traceback.print_exc()
    except KeyboardInterrupt as err:
        failures.append(f"interrupted ({err or 'Ctrl-C'})")
        print(f"\nINTERRUPTED ({err or 'Ctrl-C'})", file=sys.stderr, flush=True)
    print(goal_line("cuda" if cuda else "cpu", ms, model, args.target_r))
    return script_end(failures, csv_path)


if __name__ == "__main__":
    sys.exit(main())
