"""Benchmark of the adapted linear layer: fused Triton kernels vs torch vs PEFT vs the frozen base.

Providers, all on one frozen base ``nn.Linear`` (bias=False) and one set of adapter values:

* ``base``: the frozen ``nn.Linear`` alone (the floor; rows have ``r`` empty), timed once per
  shape x tokens;
* ``fused``: ``adalora_fast.SVDLinear`` with ``backend="triton"`` (the fused kernels);
* ``torch``: ``adalora_fast.SVDLinear`` with ``backend="torch"`` (PEFT's op order in PyTorch);
* ``peft``: PEFT 0.21's ``peft.tuners.adalora.layer.SVDLinear``, lora_dropout 0.

Adapters are fp32 (SVDLinear's default, also on bf16 bases) with random non-zero A, E, B; x is
(tokens, d_in) and requires grad. Modes (``harness.MODES``): ``fwd`` (forward with autograd
recording, as in training), ``bwd`` (backward alone), ``fwd+bwd``; every gradient is set to None
before each call. Before ``fused`` is timed, its output and every gradient are checked against
``torch`` (max |diff| / max |ref| per tensor); a config that fails the check is not timed.

On CUDA: the Llama-7B grid (4096->4096, 4096->11008, 11008->4096; tokens 2048 / 8192 / 16384;
r 8 / 12 / 32 / 64), bf16 base, timed with ``triton.testing.do_bench`` (median), rows appended to
``<out>/gpu_svd_linear.csv`` after each shape x tokens block. ``--quick`` is the goal point alone:
4096->4096, 8192 tokens, r 12, where fused fwd+bwd should cost <= +10% over the base's fwd+bwd.
On the CPU: ``base``, ``torch`` and ``peft`` at 512->512, 256 tokens, r 12, fp32, timed round-robin
(``harness.time_cpu_interleaved``), appended to ``<out>/cpu_svd_linear.csv``; the fused kernels would
run in Triton's interpreter there, which is no performance figure.

    python benchmarks/bench_svd_linear.py [--out DIR] [--quick] [--providers base fused torch peft]
    pytest benchmarks/bench_svd_linear.py            # the CPU shape, with pytest-benchmark

Prints a markdown table per shape (median ms, overhead vs ``base`` in the same mode), then one
``GOAL`` line. Each measurement is guarded: a failure (OOM, PEFT API mismatch, a failed check) is
logged to stderr, the run goes on, and the exit code is 1 at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import (
    MODES,
    add_common_args,
    append_rows,
    describe_environment,
    fmt_overhead,
    force_compiled_triton,
    free_memory,
    frozen_linear,
    layer_inputs,
    layer_step,
    overhead_pct,
    script_end,
    script_start,
    time_layer_gpu,
    time_layers_cpu,
)
from torch import nn

OP = "svd_linear"
PROVIDERS = ("base", "fused", "torch", "peft")
ADAPTED = ("fused", "torch", "peft")
BACKENDS = {"fused": "triton", "torch": "torch"}
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
GPU_TOKENS = (2048, 8192, 16384)
GPU_RANKS = (8, 12, 32, 64)
GOAL = {"d_in": 4096, "d_out": 4096, "tokens": 8192, "r": 12}
GOAL_PCT = 10.0
CPU_SHAPE = {"d_in": 512, "d_out": 512, "tokens": 256, "r": 12}
CPU_PROVIDERS = ("base", "torch", "peft")
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
GPU_CSV, CPU_CSV = "gpu_svd_linear.csv", "cpu_svd_linear.csv"
SEED = 0


class FatalDeviceError(RuntimeError):
    """The CUDA context is unusable (e.g. an illegal memory access): later measurements cannot run."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- layers -------------------------------------------------------------------------------------
def make_base(d_in: int, d_out: int, device: str | torch.device, dtype: torch.dtype) -> nn.Linear:
    """The frozen base layer (bias=False), built on ``device`` in ``dtype``."""
    return frozen_linear(d_in, d_out, device, dtype, seed=SEED)


def make_inputs(
    tokens: int, d_in: int, d_out: int, device: str | torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dy)``: random activations (x requires grad) and output gradient."""
    return layer_inputs(tokens, d_in, d_out, device, dtype, seed=SEED + 1)


def make_ours(base: nn.Linear, r: int, backend: str) -> nn.Module:
    """``adalora_fast.SVDLinear`` on ``base`` with random non-zero A, E, B (the same for every call).

    Magnitudes make the adapter term about as large as the base's output (A ~ N(0, 1/d_in),
    E ~ N(0, 1), B ~ N(0, 1/r), lora_alpha = r so the scale is ~1), so a wrong kernel shows.
    """
    from adalora_fast import SVDLinear

    layer = SVDLinear(base, r=r, lora_alpha=float(r), lora_dropout=0.0, backend=backend)
    g = torch.Generator().manual_seed(SEED + 2)  # on the CPU: the same values on every device
    with torch.no_grad():
        for p, std in ((layer.lora_A, base.in_features**-0.5), (layer.lora_E, 1.0), (layer.lora_B, r**-0.5)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return layer.train()


def make_peft(base: nn.Linear, ours: nn.Module) -> nn.Module:
    """PEFT's AdaLoRA ``SVDLinear`` on ``base``, with ``ours``' adapter values (fp32, as
    ``get_peft_model`` leaves them); ranknum stays PEFT's own (= r)."""
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import SVDLinear as PeftSVDLinear

    r = ours.lora_A.shape[0]
    cfg = AdaLoraConfig(
        init_r=r, target_r=r, lora_alpha=ours.lora_alpha, lora_dropout=0.0, total_step=1000,
        target_modules=["base"],
    )  # fmt: skip
    layer = PeftSVDLinear(base, "default", config=cfg, r=r, lora_alpha=ours.lora_alpha)
    for name in ("lora_A", "lora_E", "lora_B"):
        getattr(layer, name)["default"] = nn.Parameter(getattr(ours, name).detach().clone())
    # As get_peft_model (mark_only_adapters_as_trainable): only lora_* train; moving the adapter to
    # the base's device re-wraps ranknum as a Parameter that requires grad, which PEFT then freezes.
    for name, p in layer.named_parameters():
        p.requires_grad_(name.startswith("lora_"))
    return layer.train()


def trainable(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``[(short name, parameter)]`` of the parameters that get gradients (lora_A, lora_E, lora_B)."""
    params = [(n.split(".")[0], p) for n, p in layer.named_parameters() if p.requires_grad]
    names = sorted(n for n, _ in params)
    if names not in ([], ["lora_A", "lora_B", "lora_E"]):
        raise ValueError(f"{type(layer).__name__}: unexpected trainable parameters {names}")
    return params


def build(provider: str, base: nn.Linear, r: int, ours_torch: nn.Module | None = None) -> nn.Module:
    """One adapted provider's layer; ``peft`` copies its values from ``ours_torch`` (or a fresh one)."""
    if provider in BACKENDS:
        return make_ours(base, r, BACKENDS[provider])
    if provider == "peft":
        return make_peft(base, ours_torch if ours_torch is not None else make_ours(base, r, "torch"))
    raise ValueError(f"unknown provider {provider!r}")


# ---- correctness --------------------------------------------------------------------------------
def outputs_and_grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """``y`` and the gradients of x and of every trainable parameter after ``layer(x).backward(dy)``."""
    params = trainable(layer)
    xx = x.detach().clone().requires_grad_(True)
    for _, p in params:
        p.grad = None
    with torch.enable_grad():
        y = layer(xx)
        y.backward(dy)
    out = {"y": y.detach(), "dx": xx.grad}
    for name, p in params:
        out[f"d{name.removeprefix('lora_')}"] = p.grad
        p.grad = None
    return out


def max_rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """``max |a - b| / max |b|`` in fp32 (inf when a is missing or shapes differ; NaN propagates)."""
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(
    candidate: nn.Module, reference: nn.Module, x: torch.Tensor, dy: torch.Tensor, tol: float
) -> tuple[bool, dict[str, float]]:
    """Compare y and every gradient of ``candidate`` with ``reference``: ``(all <= tol, errors)``."""
    got = outputs_and_grads(candidate, x, dy)
    want = outputs_and_grads(reference, x, dy)
    errs = {k: max_rel_err(got.get(k), v) for k, v in want.items()}
    del got, want
    return all(e <= tol for e in errs.values()), errs  # NaN compares False: a failure


def fused_problem(layer: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``layer`` (backend="triton") would not run the compiled fused kernels on ``x``, or None.

    The layer falls back to the torch path (with a one-time warning) when the kernels cannot take
    the call; such a layer must not be reported as ``fused``.
    """
    from adalora_fast import backend, functional

    if backend.resolve(OP, "triton", x.device) != "triton":
        return backend.explain(OP, "triton", x.device)
    choice = functional.svd_linear_choice(x, layer.base_layer.weight, layer.lora_A, "triton")
    if choice.reason is not None:
        return f"the fused path falls back to torch: {choice.reason}"
    if x.device.type == "cuda" and backend.interpreting():
        return "the kernels run in Triton's interpreter (TRITON_INTERPRET set before import)"
    return None


def fmt_errs(errs: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1e}" for k, v in errs.items())


# ---- results ------------------------------------------------------------------------------------
@dataclass
class Run:
    """Results of one run: timings keyed by (d_in, d_out, tokens, r, provider, mode), and failures."""

    device: str
    dtype: torch.dtype
    csv_path: Path | None
    ms: dict[tuple, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)

    def record(self, d_in: int, d_out: int, tokens: int, r: int | None, provider: str, mode: str, ms: float):
        self.ms[(d_in, d_out, tokens, r, provider, mode)] = ms
        self.pending.append(
            {
                "op": OP, "mode": mode, "provider": provider, "d_in": d_in, "d_out": d_out,
                "tokens": tokens, "r": r, "dtype": dtype_name(self.dtype), "median_ms": ms,
            }
        )  # fmt: skip
        print(
            f"  {d_in}->{d_out} tokens {tokens:5d} r {r if r is not None else '-':>2} {provider:5s} "
            f"{mode:7s} {ms:9.3f} ms",
            flush=True,
        )

    def fail(self, what: str, err: BaseException | str) -> None:
        msg = f"{what}: {err}" if isinstance(err, str) else f"{what}: {type(err).__name__}: {err}"
        self.failures.append(msg)
        print(f"FAILED {msg}", file=sys.stderr, flush=True)
        if isinstance(err, BaseException):
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
            text = str(err)
            if self.device == "cuda" and "CUDA error" in text and "out of memory" not in text:
                raise FatalDeviceError(msg) from err

    def flush(self) -> None:
        """Append the rows measured since the last flush to the CSV (so a killed run keeps them)."""
        if self.csv_path is not None and self.pending:
            append_rows(self.csv_path, self.pending)
        self.pending = []

    def get(self, d_in: int, d_out: int, tokens: int, r: int | None, provider: str, mode: str):
        return self.ms.get((d_in, d_out, tokens, r, provider, mode))


def print_table(run: Run, d_in: int, d_out: int, tokens_list: Sequence[int], ranks: Sequence[int]) -> None:
    """Markdown table of one shape: median ms and overhead vs ``base`` in the same mode."""
    print(f"\n### {OP} {d_in}->{d_out}, {dtype_name(run.dtype)} base, fp32 adapters ({run.device})\n")
    head = " | ".join(f"{m} ms | {m} vs base" for m in MODES)
    print(f"| tokens | r | provider | {head} |")
    print("|---:|---:|---|" + "---:|---:|" * len(MODES))
    for tokens in tokens_list:
        base = {m: run.get(d_in, d_out, tokens, None, "base", m) for m in MODES}
        keys = [(None, "base")] + [(r, p) for r in ranks for p in ADAPTED]
        for r, provider in keys:
            ms = {m: run.get(d_in, d_out, tokens, r, provider, m) for m in MODES}
            if all(v is None for v in ms.values()):
                continue
            cells = " | ".join(
                f"{'-' if ms[m] is None else f'{ms[m]:.3f}'} | "
                f"{'' if provider == 'base' else fmt_overhead(ms[m], base[m])}"
                for m in MODES
            )
            print(f"| {tokens} | {'-' if r is None else r} | {provider} | {cells} |")
    print(flush=True)


def goal_line(run: Run) -> str:
    """The one-line verdict on the goal point (fused fwd+bwd vs base fwd+bwd, <= +10%)."""
    g = GOAL
    what = f"GOAL fused fwd+bwd {g['d_in']}->{g['d_out']} tokens {g['tokens']} r {g['r']} vs base fwd+bwd"
    fused = run.get(g["d_in"], g["d_out"], g["tokens"], g["r"], "fused", "fwd+bwd")
    base = run.get(g["d_in"], g["d_out"], g["tokens"], None, "base", "fwd+bwd")
    if fused is None or base is None:
        why = "needs CUDA" if run.device != "cuda" else "fused or base not measured (see failures above)"
        return f"{what} (goal <= +{GOAL_PCT:.0f}%): NOT MEASURED ({why})"
    pct = overhead_pct(fused, base)
    verdict = "MET" if pct is not None and pct <= GOAL_PCT else "NOT MET"
    return f"{what}: {fused:.3f} ms vs {base:.3f} ms = {pct:+.1f}% (goal <= +{GOAL_PCT:.0f}%): {verdict}"


# ---- GPU grid -----------------------------------------------------------------------------------
def run_grid(
    run: Run,
    shapes: Sequence[tuple[int, int]],
    tokens_list: Sequence[int],
    ranks: Sequence[int],
    providers: Sequence[str],
    warmup: int = 25,
    rep: int = 100,
) -> None:
    """Time every provider at every config with :func:`harness.time_layer_gpu`, one at a time.

    The device is ``run.device`` (the timer needs CUDA; everything else runs anywhere). Rows are
    flushed to the CSV after each shape x tokens block and a table is printed after each shape.
    """
    tol = TOL[run.dtype]
    adapted = [p for p in ADAPTED if p in providers]
    for d_in, d_out in shapes:
        for tokens in tokens_list:
            tag = f"{d_in}->{d_out} tokens {tokens}"
            try:
                base = make_base(d_in, d_out, run.device, run.dtype)
                x, dy = make_inputs(tokens, d_in, d_out, run.device, run.dtype)
            except Exception as err:
                run.fail(f"setup {tag}", err)
                free_memory()
                continue
            if "base" in providers:
                for mode in MODES:
                    try:
                        ms = time_layer_gpu(base, x, dy, [x], modes=[mode], warmup=warmup, rep=rep)[mode]
                        run.record(d_in, d_out, tokens, None, "base", mode, ms)
                    except Exception as err:
                        run.fail(f"base {tag} {mode}", err)
                free_memory()
            for r in ranks:
                run_rank(run, base, x, dy, r, adapted, tol, warmup, rep)
            run.flush()
            del base, x, dy
            free_memory()
        print_table(run, d_in, d_out, tokens_list, ranks)


def run_rank(
    run: Run,
    base: nn.Linear,
    x: torch.Tensor,
    dy: torch.Tensor,
    r: int,
    adapted: Sequence[str],
    tol: float,
    warmup: int,
    rep: int,
) -> None:
    """Build, check and time the adapted providers at rank ``r`` (torch is built for the checks)."""
    d_in, d_out, tokens = base.in_features, base.out_features, x.shape[0]
    tag = f"{d_in}->{d_out} tokens {tokens} r {r}"
    layers: dict[str, nn.Module] = {}
    wanted = list(adapted)
    if ("fused" in wanted or "peft" in wanted) and "torch" not in wanted:
        wanted.insert(0, "torch")  # the reference of the checks, not timed
    for provider in sorted(wanted, key=ADAPTED.index):
        try:
            layers[provider] = build(provider, base, r, layers.get("torch"))
        except Exception as err:
            run.fail(f"build {provider} {tag}", err)
    for provider in ("fused", "peft"):
        if provider not in layers:
            continue
        if "torch" not in layers:
            run.fail(f"check {provider} {tag}", "no torch reference to check against; not timed")
            del layers[provider]
            continue
        try:
            problem = fused_problem(layers[provider], x) if provider == "fused" else None
            if problem is not None:
                run.fail(f"check {provider} {tag}", f"{problem}; not timed")
                del layers[provider]
                continue
            ok, errs = check(layers[provider], layers["torch"], x, dy, tol)
        except Exception as err:
            run.fail(f"check {provider} {tag}", err)
            del layers[provider]
            free_memory()
            continue
        print(
            f"check {provider} vs torch {tag}: {fmt_errs(errs)} (max rel, tol {tol:g}): "
            f"{'OK' if ok else 'FAILED'}",
            flush=True,
        )
        if not ok:
            run.fail(f"check {provider} {tag}", f"{fmt_errs(errs)} > tol {tol:g}; not timed")
            del layers[provider]
        free_memory()
    for provider in adapted:
        if provider not in layers:
            continue
        layer = layers[provider]
        for mode in MODES:
            try:
                grads = [x] + [p for _, p in trainable(layer)]
                ms = time_layer_gpu(layer, x, dy, grads, modes=[mode], warmup=warmup, rep=rep)[mode]
                run.record(d_in, d_out, tokens, r, provider, mode, ms)
            except Exception as err:
                run.fail(f"{provider} {tag} {mode}", err)
            finally:
                grads = None
        del layer
        free_memory()
    layers.clear()
    free_memory()


# ---- CPU ----------------------------------------------------------------------------------------
def cpu_layers(
    providers: Sequence[str], run: Run | None = None, shape: dict[str, int] = CPU_SHAPE
) -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    """``({provider: layer}, x, dy)`` at the CPU shape; build failures go to ``run`` (or raise)."""
    d_in, d_out, tokens, r = shape["d_in"], shape["d_out"], shape["tokens"], shape["r"]
    dtype = run.dtype if run is not None else torch.float32
    base = make_base(d_in, d_out, "cpu", dtype)
    x, dy = make_inputs(tokens, d_in, d_out, "cpu", dtype)
    layers: dict[str, nn.Module] = {}
    for provider in providers:
        try:
            layers[provider] = base if provider == "base" else build(provider, base, r, layers.get("torch"))
        except Exception as err:
            if run is None:
                raise
            run.fail(f"build {provider} cpu", err)
    return layers, x, dy


def run_cpu(run: Run, providers: Sequence[str], warmup: int, iters: int) -> None:
    """The CPU shape: base / torch / peft timed round-robin, one mode at a time."""
    s = CPU_SHAPE
    skipped = [p for p in providers if p not in CPU_PROVIDERS]
    if skipped:
        print(f"note: {skipped} skipped on the CPU (the fused kernels would run in Triton's interpreter)")
    layers, x, dy = cpu_layers([p for p in CPU_PROVIDERS if p in providers], run)
    if "peft" in layers and "torch" in layers:
        try:
            ok, errs = check(layers["peft"], layers["torch"], x, dy, TOL[run.dtype])
            print(f"check peft vs torch (CPU): {fmt_errs(errs)}: {'OK' if ok else 'FAILED'}")
            if not ok:
                run.fail("check peft cpu", f"{fmt_errs(errs)} > tol {TOL[run.dtype]:g}")
        except Exception as err:
            run.fail("check peft cpu", err)
    for mode in MODES:
        try:
            grads = {name: [x] + [p for _, p in trainable(layer)] for name, layer in layers.items()}
            times = time_layers_cpu(layers, x, dy, grads, mode, warmup=warmup, iters=iters)
        except Exception as err:
            run.fail(f"cpu {mode}", err)
            continue
        for provider, ts in times.items():
            r = None if provider == "base" else s["r"]
            run.record(s["d_in"], s["d_out"], s["tokens"], r, provider, mode, statistics.median(ts))
    run.flush()
    print_table(run, s["d_in"], s["d_out"], [s["tokens"]], [s["r"]])


# ---- pytest-benchmark (CPU shape) ---------------------------------------------------------------
def cpu_group(mode: str) -> str:
    s = CPU_SHAPE
    return f"{OP} {mode} {s['d_in']}->{s['d_out']} tokens {s['tokens']} r{s['r']} fp32 (CPU)"


@pytest.fixture(scope="module")
def cpu_setup() -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    pytest.importorskip("peft")
    return cpu_layers(CPU_PROVIDERS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_svd_linear_cpu(benchmark: Any, cpu_setup: Any, provider: str, mode: str) -> None:
    layers, x, dy = cpu_setup
    layer = layers[provider]
    benchmark.group = cpu_group(mode)
    benchmark.extra_info.update(provider=provider, mode=mode, threads=torch.get_num_threads())
    step = layer_step(mode, layer, x, dy, [x] + [p for _, p in trainable(layer)])
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)


def test_svd_linear_cpu_peft_matches_torch(cpu_setup: Any) -> None:
    layers, x, dy = cpu_setup
    ok, errs = check(layers["peft"], layers["torch"], x, dy, TOL[torch.float32])
    assert ok, fmt_errs(errs)
    assert set(errs) == {"y", "dx", "dA", "dE", "dB"}


# ---- script mode --------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        d_in, _, d_out = item.partition("x")
        out.append((int(d_in), int(d_out)))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--quick", action="store_true", help="the goal point only: 4096->4096, 8192 tokens, r 12"
    )
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--shapes", type=_shapes, help="GPU shapes as d_inxd_out,... (e.g. 4096x11008)")
    parser.add_argument("--tokens", type=_ints, help="GPU token counts, comma-separated")
    parser.add_argument("--ranks", type=_ints, help="GPU ranks, comma-separated")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per provider and mode (CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `timeout` sends SIGTERM: stop like Ctrl-C, so the rows measured so far are flushed and the
    # goal line is printed (KeyboardInterrupt is not caught by the per-measurement guards).
    cuda, csv_path = script_start(args.out, args.no_csv, args.threads, GPU_CSV, CPU_CSV)
    run = Run("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32, csv_path)
    print(f"# {OP} benchmark\n\n{describe_environment()}\n", flush=True)
    try:
        if cuda:
            force_compiled_triton()
            if args.quick:
                shapes, tokens, ranks = [(GOAL["d_in"], GOAL["d_out"])], [GOAL["tokens"]], [GOAL["r"]]
            else:
                shapes, tokens, ranks = list(GPU_SHAPES), list(GPU_TOKENS), list(GPU_RANKS)
            shapes, tokens, ranks = args.shapes or shapes, args.tokens or tokens, args.ranks or ranks
            print(
                f"grid: shapes {shapes} tokens {tokens} r {ranks} providers {args.providers}; "
                f"do_bench median, warmup {args.warmup} ms, rep {args.rep} ms\n",
                flush=True,
            )
            run_grid(run, shapes, tokens, ranks, args.providers, warmup=args.warmup, rep=args.rep)
        else:
            print(f"no CUDA: CPU shape {CPU_SHAPE}, fp32, {args.iters} round-robin calls\n", flush=True)
            run_cpu(run, args.providers, warmup=3, iters=args.iters)
    except FatalDeviceError as err:
        print(f"aborting: the CUDA context is unusable after {err}", file=sys.stderr)
    except Exception as err:  # outside the per-measurement guards (e.g. a broken CUDA context)
        run.failures.append(f"unexpected {type(err).__name__}: {err}")
        print("\nABORTED by an unexpected error:", file=sys.stderr)
        traceback.print_exc()
    except KeyboardInterrupt as err:
        run.failures.append(f"interrupted ({err or 'Ctrl-C'}): the grid is incomplete")
        print(f"\nINTERRUPTED ({err or 'Ctrl-C'}): the grid is incomplete", file=sys.stderr, flush=True)
    finally:
        run.flush()
    print(goal_line(run))
    return script_end(run.failures, csv_path)


if __name__ == "__main__":
    sys.exit(main())
