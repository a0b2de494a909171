"""The benchmarks' shared harness: one runner, the results CSV, timers, tiny models and the common CLI.

A benchmark script (``bench_<op>.py``) builds its inputs and declares its providers as a
:class:`Case` per configuration (``setup(config) -> Case``), and hands them to :func:`run`, which
for every case:

1. runs the case's one correctness check on each provider it names (``check(provider) -> (ok,
   description)``, printed as ``check <provider> vs <reference>: ...: OK``); a provider that fails
   it (or raises) is recorded as a failure and not timed;
2. times the providers: on CUDA ``triton.testing.do_bench`` medians (:func:`gpu_median_ms`,
   ``--warmup`` / ``--rep`` ms, at least ``--min-samples`` timed calls, ``--rounds`` rounds in
   rotating order, median over rounds); on the CPU medians of ``--iters`` interleaved rounds
   (:func:`time_cpu_interleaved`: the providers run round-robin, so a shared machine's drift hits
   all of them alike) after ``--cpu-warmup`` untimed ones, with the spread and the per-round ratio
   to the baseline printed. The case's ``baseline`` (the frozen base, or PEFT) is always timed in
   the same run, whatever ``--providers`` says;
3. appends one row per provider and mode to the CSV (:data:`COLUMNS`, environment columns filled in;
   ``<--out>/<gpu or cpu csv>``), also when interrupted (SIGTERM and SIGINT stop like Ctrl-C), and
   prints a markdown table ``| provider | mode | median ms | ... | vs <baseline> |``.

Then the script's ``goals(results)`` lines are printed (``GOAL ...``); the exit code is 1 when
anything failed (each failure is printed as ``FAILED ...`` when it happens and listed at the end).

Also here: :func:`tiny_llama` and :func:`make_adapters` (models and PEFT-named adapter sets built
without downloads), :func:`frozen_linear` / :func:`layer_inputs` / :func:`layer_step` (one adapted
layer's timed closures per mode of :data:`MODES`), :func:`op_counts` (ATen ops and GPU kernels of
one call), :func:`force_compiled_triton` and :func:`pytest_benchmark` (a case's provider under
pytest-benchmark: ``pytest benchmarks/bench_<op>.py --benchmark-only``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from adalora_fast.testing import random_llama

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent

COLUMNS = (
    "op",
    "mode",
    "provider",
    "d_in",
    "d_out",
    "tokens",
    "r",
    "dtype",
    "median_ms",
    "host_us",
    "device_us",
    "gpu",
    "torch",
    "triton",
    "commit",
    "date",
)
ENV_COLUMNS = ("gpu", "torch", "triton", "commit", "date")
# The header before the host_us / device_us columns (2026-12-03): such files get the new header, the
# two cells empty in their rows (nothing was measured there), at their next append.
OLD_COLUMNS = tuple(c for c in COLUMNS if c not in ("host_us", "device_us"))
FLOORS = ("base", "frozen")  # baselines that are a floor (overhead over them); others: speedup over them

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_ADAPTER = "default"  # PEFT's adapter name: parameters are named <module>.lora_A.default etc.
VIEW_OPS = {
    "aten::alias",
    "aten::as_strided",
    "aten::detach",
    "aten::expand",
    "aten::narrow",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::select",
    "aten::slice",
    "aten::split",
    "aten::split_with_sizes",
    "aten::squeeze",
    "aten::t",
    "aten::transpose",
    "aten::unsqueeze",
    "aten::view",
    "aten::_unsafe_view",
    "aten::lift_fresh",
    "aten::numpy_T",
    "aten::unflatten_dense_tensors",
}
# Adapter sets of the allocator and regulariser benchmarks (make_adapters arguments): Llama-7B's
# 32 layers x 7 projections on GPUs; the CPU goal shape (d = 512) on the CPU.
GPU_ADAPTERS = {"layers": 32, "d": 4096, "d_ff": 11008, "r": 12}
CPU_ADAPTERS = {"layers": 32, "d": 512, "d_ff": 1376, "r": 12}


# ---- models and adapters ------------------------------------------------------------------------
def tiny_llama(
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 64,
    seed: int = 0,
    *,
    heads: int | None = None,
    kv_heads: int | None = None,
    max_positions: int = 256,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """``adalora_fast.testing.random_llama`` with the benchmarks' defaults: ``heads`` defaults to
    ``hidden // 64`` (at least 1), ``kv_heads`` to ``heads``."""
    heads = heads if heads is not None else max(1, hidden // 64)
    kv_heads = kv_heads if kv_heads is not None else heads
    return random_llama(
        layers, hidden, intermediate, vocab, seed,
        heads=heads, kv_heads=kv_heads, max_positions=max_positions, dtype=dtype, device=device,
    )  # fmt: skip


def projection_shapes(d: int, d_ff: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each Llama projection: q, k, v, o d -> d; gate, up d -> d_ff; down d_ff -> d."""
    return {
        "q_proj": (d, d),
        "k_proj": (d, d),
        "v_proj": (d, d),
        "o_proj": (d, d),
        "gate_proj": (d, d_ff),
        "up_proj": (d, d_ff),
        "down_proj": (d_ff, d),
    }


def make_adapters(
    layers: int,
    d: int,
    d_ff: int,
    r: int,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[tuple[str, torch.nn.Parameter]]:
    """PEFT-named adapter parameters ``[(name, p)]`` of a Llama-shaped model, no base weights:
    ``base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.<lora_A|lora_B|lora_E>.default`` in
    PEFT's ``named_parameters()`` order (A r x d_in, B d_out x r, E r x 1). Random values from
    ``seed``: A and B ~ N(0, 0.02) (PEFT's init), E ~ N(0, 1) (a trained E, so scores are non-zero)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = projection_shapes(d, d_ff)
    named = []
    for i in range(layers):
        for proj in LLAMA_PROJ:
            d_in, d_out = shapes[proj]
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
            for kind, shape, std in (
                ("lora_A", (r, d_in), 0.02),
                ("lora_B", (d_out, r), 0.02),
                ("lora_E", (r, 1), 1.0),
            ):
                t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
                named.append((f"{prefix}.{kind}.{PEFT_ADAPTER}", torch.nn.Parameter(t.to(dtype))))
    return named


# ---- per-layer closures -------------------------------------------------------------------------
MODES = ("fwd", "bwd", "fwd+bwd")


def frozen_linear(
    d_in: int, d_out: int, device: str | torch.device, dtype: torch.dtype, seed: int = 0, bias: bool = False
) -> torch.nn.Linear:
    """A frozen ``nn.Linear(d_in, d_out)`` (the base of an adapted layer), built on ``device``."""
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out, bias=bias, device=device, dtype=dtype).requires_grad_(False)


def layer_inputs(
    tokens: int, d_in: int, d_out: int, device: str | torch.device, dtype: torch.dtype, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dy)``: random activations (tokens, d_in) that require grad, and an output gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, generator=g).requires_grad_(True)
    return x, torch.randn(tokens, d_out, device=device, dtype=dtype, generator=g)


def _set_none(grads: Sequence[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def layer_step(
    mode: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    dy: torch.Tensor,
    grads: Sequence[torch.Tensor] = (),
) -> Callable[[], None]:
    """The timed closure of ``mode`` (:data:`MODES`) for the layer-like ``fn``; each call first sets
    the ``.grad`` of ``grads`` (x and the trainable parameters) to None, as ``zero_grad`` does.
    ``fwd``: ``fn(x)`` with grad enabled, output (and graph) dropped; ``bwd``: the graph is recorded
    once, here, and each call runs ``y.backward(dy, retain_graph=True)``; ``fwd+bwd``: both."""
    grads = tuple(grads)
    if mode == "fwd":

        def step() -> None:
            _set_none(grads)
            with torch.enable_grad():
                fn(x)

    elif mode == "bwd":
        with torch.enable_grad():
            y = fn(x)
        if y.shape != dy.shape:
            raise ValueError(f"layer_step: output {tuple(y.shape)} but dy {tuple(dy.shape)}")

        def step() -> None:
            _set_none(grads)
            y.backward(dy, retain_graph=True)

    elif mode == "fwd+bwd":

        def step() -> None:
            _set_none(grads)
            with torch.enable_grad():
                fn(x).backward(dy)

    else:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    return step


# ---- environment and the results CSV ------------------------------------------------------------
def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return getattr(triton, "__version__", "")


@lru_cache(maxsize=1)
def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the repository, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> dict[str, str]:
    """The environment columns of a results row (GPU name or "cpu", versions, commit, UTC date)."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
    }


def describe_environment() -> str:
    """One line for a benchmark's printed output."""
    env = environment()
    return (
        f"device={env['gpu']} torch={env['torch']} triton={env['triton'] or '-'} "
        f"threads={torch.get_num_threads()} commit={env['commit']} date={env['date']}"
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def upgrade_header(path: Path) -> None:
    """Rewrite a results CSV of :data:`OLD_COLUMNS` with :data:`COLUMNS`, the new cells empty."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)
    tmp.replace(path)


def append_rows(csv_path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Append ``rows`` (dicts keyed by :data:`COLUMNS`; a relative path lands in ``results/``).

    Missing environment columns are filled in, other missing columns written empty; unknown keys
    raise ``ValueError``, as does an existing file whose header is not :data:`COLUMNS`."""
    path = Path(csv_path) if Path(csv_path).is_absolute() else RESULTS_DIR / csv_path
    env = environment()
    out_rows = []
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}; allowed: {COLUMNS}")
        out_rows.append({c: _cell(row[c]) if c in row else env.get(c, "") for c in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) == OLD_COLUMNS:
            upgrade_header(path)
        elif header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path} has header {header}, expected {list(COLUMNS)}")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(out_rows)
    return path


# ---- timers -------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cpu(fn: Callable[[], Any], warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of ``fn()`` in ms (CUDA synchronised around each call when present)."""
    return statistics.median(time_cpu_interleaved({"fn": fn}, warmup=warmup, iters=iters)["fn"])


def time_cpu_interleaved(
    fns: Mapping[str, Callable[[], Any]], warmup: int = 3, iters: int = 20
) -> dict[str, list[float]]:
    """``{name: [ms per call]}`` of several callables timed round-robin: each round calls every one
    once, the order rotating from round to round, so other load hits all of them alike."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        k = i % max(1, len(names))
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            _sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def gpu_median_ms(
    fn: Callable[[], Any], warmup: int = 25, rep: int = 100, min_samples: int = 1, **kwargs: Any
) -> float:
    """Median of ``triton.testing.do_bench(fn)`` in ms (``warmup`` / ``rep`` in ms, do_bench's
    meaning; extra keyword arguments go to do_bench). do_bench times about ``rep / (one call)``
    calls, so with ``min_samples`` > 1 ``fn`` is first timed on its own (:func:`time_cpu`, 1 + 3
    synchronised calls) and ``rep`` raised to ``min_samples`` times that. CUDA only."""
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_median_ms needs a CUDA device; use time_cpu on the CPU")
    from triton.testing import do_bench

    if min_samples > 1:
        rep = max(rep, math.ceil(min_samples * time_cpu(fn, warmup=1, iters=3)))
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median", **kwargs))


# Opt-in kernels, each a provider of its own: (kernel module, its switch).
OPT_IN = {
    "fused_fold": ("xt_s", "FOLD_DLAMBDA"),
    "fused_tma": ("xw_plus_sb_tma", "TMA_GEMM"),
    "fused_cublas": ("base_plus_svd", "FLOAT_BASES"),
}


def opted_in(provider: str, fn: Any) -> Any:
    """``fn`` run with ``provider``'s opt-in switch on (its backward included), or ``fn`` itself."""
    if provider not in OPT_IN:
        return fn
    module_name, switch = OPT_IN[provider]
    module = importlib.import_module(f"adalora_fast.kernels.{module_name}")

    def run(*args: Any) -> Any:
        before = getattr(module, switch)
        setattr(module, switch, True)
        try:
            return fn(*args)
        finally:
            setattr(module, switch, before)

    return run


def enqueue_us(fn: Callable[[], Any], iters: int = 20) -> float:
    """Median host time of one ``fn()`` in microseconds, the call starting on an idle device and not
    waited for: Python, autograd, ATen glue and kernel launches (where a layer is host-bound, this
    exceeds its device time). On the CPU simply its wall time."""
    fn()
    times = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    _sync()
    return statistics.median(times)


def device_us(fn: Callable[[], Any]) -> float | None:
    """GPU time of one ``fn()`` in microseconds: the summed durations of its kernels (``torch.profiler``,
    copies and sets included); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return float(sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA))


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks (between configurations, after failures)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def overhead_pct(ms: float | None, base_ms: float | None) -> float | None:
    """``(ms / base_ms - 1) * 100``, or None when either is missing (or the base is not positive)."""
    return None if ms is None or base_ms is None or base_ms <= 0 else (ms / base_ms - 1.0) * 100.0


def op_counts(fn: Callable[[], Any], cuda: bool = False) -> tuple[int, int | None]:
    """``(ATen ops other than views, GPU kernels)`` of one ``fn()`` call, from ``torch.profiler``
    (nested ATen ops included; GPU kernels counted with ``cuda=True`` on CUDA, copies and sets left
    out; otherwise None)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = cuda and torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with profile(activities=activities) as prof:
        fn()
        _sync()
    events = prof.events()
    aten = sum(
        1
        for e in events
        if e.device_type == DeviceType.CPU and e.name.startswith("aten::") and e.name not in VIEW_OPS
    )
    if not cuda:
        return aten, None
    copies = ("Memcpy", "Memset", "memcpy", "memset")
    return aten, sum(1 for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(copies))


def print_op_counts(
    name: str, fn: Callable[[], Any], cuda: bool = False, kernels: str = "", warm: bool = False
) -> None:
    """Print ``ops <name>: N ATen ops (views excluded) + L Triton launches[, K GPU kernels] per call``
    for one ``fn()`` call (:func:`op_counts`); the launches are those of the ``*_kernel`` globals of
    the kernel module ``kernels`` (``adalora_fast.kernels.<kernels>``, wrapped while counting; the
    launch sites look them up at each launch); ``warm``: one uncounted call first (compiles).
    Information, not a gate: errors are printed."""
    mod, launches = sys.modules.get(f"adalora_fast.kernels.{kernels}") if kernels else None, []
    originals = (
        {n: k for n, k in vars(mod).items() if n.endswith("_kernel") and hasattr(k, "__getitem__")}
        if mod
        else {}
    )

    class Counting:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Any:
            launches.append(grid)
            return self.kernel[grid]

    try:
        if warm:
            fn()
            mod = sys.modules.get(f"adalora_fast.kernels.{kernels}") if kernels else None
            originals = (
                {n: k for n, k in vars(mod).items() if n.endswith("_kernel") and hasattr(k, "__getitem__")}
                if mod
                else {}
            )
        for n, k in originals.items():
            setattr(mod, n, Counting(k))
        aten, gpu = op_counts(fn, cuda=cuda)
    except Exception as err:
        print(f"ops {name}: not counted ({type(err).__name__}: {err})", file=sys.stderr)
        return
    finally:
        for n, k in originals.items():
            setattr(mod, n, k)
    gpu_text = "" if gpu is None else f", {gpu} GPU kernels"
    print(
        f"ops {name}: {aten} ATen ops (views excluded) + {len(launches)} Triton launches{gpu_text} per call"
    )


def fused_problem(op: str, device: str | torch.device) -> str | None:
    """Why the Triton path of ``op`` (:mod:`adalora_fast.backend`'s names) would not run compiled
    kernels on ``device`` (a provider reported as ``fused`` must), or None."""
    from adalora_fast import backend

    device = torch.device(device)
    if backend.resolve(op, "triton", device) != "triton":
        return backend.explain(op, "triton", device)
    if device.type == "cuda" and backend.interpreting():
        return "the kernels run in Triton's interpreter (TRITON_INTERPRET set before import)"
    return None


def timed_here(providers: Iterable[str], device: str) -> list[str]:
    """``providers`` without ``fused`` off CUDA (the kernels would run in Triton's interpreter there,
    which is no performance figure; :func:`run` says so)."""
    return [p for p in providers if device == "cuda" or not p.startswith("fused")]


# ---- process set-up -----------------------------------------------------------------------------
def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_interrupt() -> None:
    """SIGTERM (what ``timeout`` sends) raises ``KeyboardInterrupt`` as Ctrl-C does, so a script cut
    by a deadline still writes the rows it measured and prints its verdict."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def force_compiled_triton() -> None:
    """On CUDA the kernels must be compiled, not interpreted (tests/conftest.py defaults
    ``TRITON_INTERPRET`` to 1): set it to 0 before the kernels are imported, or exit if too late."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    if "adalora_fast.kernels._common" in sys.modules:
        raise SystemExit("TRITON_INTERPRET is set and the kernels are already imported: rerun with 0")
    print("warning: TRITON_INTERPRET was set; setting it to 0 for the CUDA run", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = "0"


def add_common_args(
    parser: argparse.ArgumentParser,
    providers: Sequence[str],
    *,
    iters: tuple[int, int] = (20, 5),
    cpu_warmup: tuple[int, int] = (3, 3),
    min_samples: tuple[int, int] = (1, 1),
    rounds: tuple[int, int] = (1, 1),
    gpu: bool = True,
) -> None:
    """The options every benchmark shares: ``--out``, ``--quick``, ``--providers``, ``--iters`` and
    ``--cpu-warmup`` (CPU), ``--warmup`` / ``--rep`` / ``--min-samples`` / ``--rounds`` (do_bench,
    GPU; with ``gpu=False`` only ``--warmup``, meaning ``--cpu-warmup``), ``--threads``, ``--no-csv``.
    The tuples are (default, default with ``--quick``); :func:`parse_args` applies them."""
    add = parser.add_argument
    add("--out", default=str(RESULTS_DIR), help="folder of the CSV (default: %(default)s)")
    add("--quick", action="store_true", help="a short run (see the script's description)")
    add(
        "--providers",
        nargs="+",
        choices=providers,
        default=list(providers),
        help="providers to time (the baseline is always timed)",
    )
    add(
        "--iters",
        type=int,
        help=f"CPU: interleaved timed rounds (default {iters[0]}; {iters[1]} with --quick)",
    )
    flags = ("--cpu-warmup",) if gpu else ("--cpu-warmup", "--warmup")
    add(*flags, dest="cpu_warmup", type=int, help=f"CPU: untimed rounds (default {cpu_warmup[0]})")
    if gpu:
        add("--warmup", type=int, default=25, help="do_bench warmup in ms (GPU)")
        add("--rep", type=int, default=100, help="do_bench repetition time in ms (GPU)")
        add(
            "--min-samples",
            type=int,
            help=f"GPU: timed calls per do_bench at least (default {min_samples[0]})",
        )
        add("--rounds", type=int, help=f"GPU: do_bench rounds per provider (default {rounds[0]})")
    else:
        parser.set_defaults(warmup=25, rep=100, min_samples=1, rounds=1)
    add("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    add("--no-csv", action="store_true", help="print only, append no rows")
    parser.set_defaults(
        _defaults={
            "iters": iters,
            "cpu_warmup": cpu_warmup,
            "min_samples": min_samples,
            "rounds": rounds,
            "_order": tuple(providers),
        }
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the (default, quick default) pairs of :func:`add_common_args`
    applied and ``providers`` in the script's order."""
    args = parser.parse_args(argv)
    defaults = vars(args).pop("_defaults")
    for name, (full, quick) in ((k, v) for k, v in defaults.items() if k != "_order"):
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)
    args.providers = [p for p in defaults["_order"] if p in args.providers]
    return args


# ---- the runner ---------------------------------------------------------------------------------
class FatalDeviceError(RuntimeError):
    """The CUDA context is unusable (e.g. an illegal memory access): later measurements cannot run."""


@dataclass
class Case:
    """One configuration of a benchmark, as its ``setup`` builds it for :func:`run`.

    ``providers``: key -> the timed callable, or, with ``modes``, ``mode -> timed callable`` (each
    mode's closure built just before it is timed); ``row``: the CSV fields the providers share;
    ``fields``: per-key overrides (``provider`` when the key is not the provider's name, ``r``,
    ``mode``); ``baseline``: the key every other is compared with, always timed; ``check(key) ->
    (ok, description)``: the one correctness check, run before timing on each key of ``checked``
    (against ``reference``); ``columns``: extra table cells, ``name -> f(key, ms, {key: ms})``;
    ``failures``: what went wrong while building (see :func:`build_each`); ``host_device``: on CUDA
    also measure each key's ``host_us`` (:func:`enqueue_us`) and ``device_us`` (:func:`device_us`),
    columns of the table and the CSV (``host_iters`` calls for the enqueue median)."""

    providers: dict[str, Any]
    row: dict[str, Any]
    baseline: str
    modes: Sequence[str] | None = None
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    check: Callable[[str], tuple[bool, str]] | None = None
    checked: Sequence[str] = ()
    reference: str = ""
    columns: dict[str, Callable[[str, float, dict[str, float]], str]] = field(default_factory=dict)
    title: str = ""
    failures: list[str] = field(default_factory=list)
    host_device: bool = False
    host_iters: int = 20
    split: dict[tuple[str, str | None], tuple[float, float | None]] = field(default_factory=dict)

    def provider(self, key: str) -> str:
        return self.fields.get(key, {}).get("provider", key)

    def csv_row(self, key: str, mode: str | None, ms: float) -> dict[str, Any]:
        row = {**self.row, "provider": key, **self.fields.get(key, {}), "median_ms": ms}
        if self.host_device:
            host, device = self.split.get((key, mode), (None, None))
            row.update(host_us=host, device_us=device)
        return row if mode is None else {**row, "mode": mode}


def fail(failures: list[str], what: str, err: BaseException | str, device: str = "cpu") -> None:
    """Record and print (``FAILED ...`` on stderr, with the traceback) one failure; a CUDA error
    other than out-of-memory raises :class:`FatalDeviceError`."""
    msg = f"{what}: {err}" if isinstance(err, str) else f"{what}: {type(err).__name__}: {err}"
    failures.append(msg)
    print(f"FAILED {msg}", file=sys.stderr, flush=True)
    if isinstance(err, BaseException):
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        if device == "cuda" and "CUDA error" in str(err) and "out of memory" not in str(err):
            raise FatalDeviceError(msg) from err


def build_each(names: Iterable[str], build: Callable[[str], Any], failures: list[str]) -> dict[str, Any]:
    """``{name: build(name)}`` for the names whose build does not raise (the others are failures)."""
    built = {}
    for name in names:
        try:
            built[name] = build(name)
        except Exception as err:
            fail(failures, f"build {name}", err)
            free_memory()
    return built


class Results:
    """The rows measured so far (``rows``), those not yet in the CSV, and the failures."""

    def __init__(self, csv_path: Path | None) -> None:
        self.csv_path, self.rows, self.pending, self.failures = csv_path, [], [], []

    def get(self, **fields: Any) -> float | None:
        """``median_ms`` of the last row whose fields equal ``fields``, or None."""
        hits = [r["median_ms"] for r in self.rows if all(r.get(k) == v for k, v in fields.items())]
        return hits[-1] if hits else None

    def flush(self) -> None:
        if self.csv_path is not None and self.pending:
            append_rows(self.csv_path, self.pending)
        self.pending = []


def _spread(ts: Sequence[float]) -> tuple[float, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0], ts[0], ts[0]]
    return q[0], q[2]


def _vs(case: Case, ms: float | None, base: float | None) -> str:
    if ms is None or base is None or base <= 0:
        return "-"
    if case.provider(case.baseline) in FLOORS:
        return f"{ms / base:.3f}x ({overhead_pct(ms, base):+.1f}%)"
    return f"{base / ms:.1f}x faster"


def _time_gpu(case: Case, keys: list[str], modes: list, args: Any, res: Results, ms: dict) -> None:
    per: dict[tuple[str, str | None], list[float]] = {}
    failed: set[str] = set()
    for i in range(args.rounds):
        k = i % len(keys)
        for key in [k for k in keys[k:] + keys[:k] if k not in failed]:  # a failure: not in later rounds
            for mode in modes:
                try:
                    step = case.providers[key] if mode is None else case.providers[key](mode)
                    t = gpu_median_ms(step, warmup=args.warmup, rep=args.rep, min_samples=args.min_samples)
                except Exception as err:
                    failed.add(key)
                    fail(res.failures, f"{key} {mode or ''} timing".replace("  ", " "), err, "cuda")
                    continue
                finally:
                    step = None
                per.setdefault((key, mode), []).append(t)
                ms[key, mode] = statistics.median(per[key, mode])
                print(f"  round {i + 1} {key:16s} {mode or '':8s} {t:10.3f} ms", flush=True)
            free_memory()
    if case.host_device:
        _time_host_device(case, [k for k in keys if k not in failed], modes, res)


def _time_host_device(case: Case, keys: list[str], modes: list, res: Results) -> None:
    """Each key's enqueue time and kernel time, after the do_bench rounds (a profiler run last)."""
    for key in keys:
        for mode in modes:
            try:
                step = case.providers[key] if mode is None else case.providers[key](mode)
                case.split[key, mode] = (enqueue_us(step, case.host_iters), device_us(step))
            except Exception as err:
                fail(res.failures, f"{key} {mode or ''} host/device split".replace("  ", " "), err, "cuda")
            finally:
                step = None
            host, device = case.split.get((key, mode), (None, None))
            if host is not None:
                print(f"  {key:16s} {mode or '':8s} host {host:9.1f} us  device {device or 0:9.1f} us")
        free_memory()


def _time_cpu(case: Case, keys: list[str], modes: list, args: Any, res: Results, ms: dict) -> None:
    load = os.getloadavg()
    for mode in modes:
        steps = build_each(
            keys, lambda k, m=mode: case.providers[k] if m is None else case.providers[k](m), res.failures
        )
        try:
            times = time_cpu_interleaved(steps, warmup=args.cpu_warmup, iters=args.iters)
        except Exception as err:
            fail(res.failures, f"cpu {mode or 'timing'}", err)
            continue
        finally:
            steps = None
        base = times.get(case.baseline)
        for key, ts in times.items():
            ms[key, mode] = statistics.median(ts)
            q1, q3 = _spread(ts)
            print(
                f"  {key:16s} {mode or '':8s} median {ms[key, mode]:9.3f} ms  min {min(ts):9.3f}  "
                f"quartiles {q1:9.3f} .. {q3:9.3f}  max {max(ts):9.3f}"
            )
            if base is not None and key != case.baseline:
                floor = case.provider(case.baseline) in FLOORS
                ratios = [(a / b if floor else b / a) for a, b in zip(ts, base, strict=True)]
                q1, q3 = _spread(ratios)
                name = f"{key}/{case.baseline}" if floor else f"{case.baseline}/{key}"
                print(
                    f"    {name} per round: median {statistics.median(ratios):.3f}x, quartiles "
                    f"{q1:.3f}x .. {q3:.3f}x; ratio of minima "
                    f"{(min(ts) / min(base)) if floor else (min(base) / min(ts)):.3f}x"
                )
    after = os.getloadavg()
    print(
        f"  {args.iters} interleaved rounds after {args.cpu_warmup} untimed; load average before "
        f"{'/'.join(f'{x:.2f}' for x in load)}, after {'/'.join(f'{x:.2f}' for x in after)} on "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        flush=True,
    )


def _table(case: Case, keys: list[str], modes: list, ms: dict) -> None:
    extra = list(case.columns) + (["host us", "device us"] if case.split else [])
    print("\n| provider | mode | median ms | " + "".join(f"{c} | " for c in extra) + f"vs {case.baseline} |")
    print("|---|---|---:|" + "---:|" * (len(extra) + 1))
    for key in keys:
        for mode in modes:
            t = ms.get((key, mode))
            mode_name = mode or {**case.row, **case.fields.get(key, {})}.get("mode", "")
            same = {k: v for (k, m), v in ms.items() if m == mode}
            cells = "".join(f"{'-' if t is None else f(key, t, same)} | " for f in case.columns.values())
            if case.split:
                host, device = case.split.get((key, mode), (None, None))
                cells += "".join("- | " if v is None else f"{v:.0f} | " for v in (host, device))
            vs = "" if key == case.baseline else _vs(case, t, ms.get((case.baseline, mode)))
            print(f"| {key} | {mode_name} | {'not measured' if t is None else f'{t:.3f}'} | {cells}{vs} |")
    print(flush=True)


def run_case(case: Case, args: Any, device: str, res: Results) -> None:
    """Check, time, record and tabulate one :class:`Case` (see the module docstring)."""
    if case.title:
        print(f"\n## {case.title}\n", flush=True)
    res.failures += case.failures
    selected = [k for k in case.providers if k == case.baseline or case.provider(k) in args.providers]
    keys = list(selected)
    for key in [k for k in case.checked if k in keys]:
        try:
            ok, desc = case.check(key)
        except Exception as err:
            keys.remove(key)
            fail(res.failures, f"check {key}", err, device)
            continue
        finally:
            free_memory()
        print(f"check {key} vs {case.reference}: {desc}: {'OK' if ok else 'FAILED'}", flush=True)
        if not ok:
            keys.remove(key)
            fail(res.failures, f"check {key}", f"{desc}; not timed")
    modes, ms = list(case.modes or [None]), {}
    try:
        if keys:
            (_time_gpu if device == "cuda" else _time_cpu)(case, keys, modes, args, res, ms)
    finally:
        for (key, mode), t in ms.items():
            row = case.csv_row(key, mode, t)
            res.rows.append(row)
            res.pending.append(row)
        res.flush()
        _table(case, selected, modes, ms)


def run(
    args: Any,
    configs: Iterable[Any],
    setup: Callable[[Any], Case],
    *,
    title: str,
    device: str,
    csv_names: tuple[str, str],
    goals: Callable[[Results], Iterable[str]] | None = None,
    intro: str = "",
) -> int:
    """Run a benchmark: ``setup(config)`` for each config, then :func:`run_case`; ``csv_names`` is
    (GPU CSV, CPU CSV); ``goals(results)`` gives the closing ``GOAL`` lines. Returns the exit code."""
    sigterm_as_interrupt()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        force_compiled_triton()
    name = csv_names[0] if device == "cuda" else csv_names[1]
    res = Results(None if args.no_csv else Path(args.out).expanduser().resolve() / name)
    print(f"# {title}\n\n{describe_environment()}\n", flush=True)
    if device == "cuda":
        print(
            f"do_bench medians: warmup {args.warmup} ms, rep {args.rep} ms, >= {args.min_samples} timed "
            f"calls, {args.rounds} round(s); providers {' '.join(args.providers)}"
        )
    else:
        print(
            f"{device}: medians of {args.iters} interleaved rounds after {args.cpu_warmup} untimed; "
            f"providers {' '.join(args.providers)}"
        )
    if device != "cuda" and "fused" in args.providers:
        intro = "note: fused skipped on the CPU (the kernels would run in Triton's interpreter)\n" + intro
    print(intro + "\n" if intro else "", flush=True)
    try:
        for config in configs:
            try:
                case = setup(config)
            except Exception as err:
                fail(res.failures, f"setup {config}", err, device)
                free_memory()
                continue
            run_case(case, args, device, res)
            case = None
            free_memory()
    except FatalDeviceError as err:
        print(f"aborting: the CUDA context is unusable after {err}", file=sys.stderr)
    except KeyboardInterrupt as err:
        res.failures.append(f"interrupted ({err or 'Ctrl-C'}): the run is incomplete")
        print(f"\nINTERRUPTED ({err or 'Ctrl-C'}): the run is incomplete", file=sys.stderr, flush=True)
    except Exception as err:  # outside the per-measurement guards
        res.failures.append(f"unexpected {type(err).__name__}: {err}")
        print("\nABORTED by an unexpected error:", file=sys.stderr)
        traceback.print_exc()
    finally:
        res.flush()
    for line in goals(res) if goals else ():
        print(line)
    if res.csv_path is not None:
        print(f"CSV: {res.csv_path}")
    if res.failures:
        print(f"\n{len(res.failures)} failure(s):", file=sys.stderr)
        for msg in res.failures:
            print(f"  {msg}", file=sys.stderr)
    return 1 if res.failures else 0


def pytest_benchmark(
    benchmark: Any, case: Case, key: str, mode: str | None = None, rounds: int = 10, warmup: int = 2
) -> None:
    """One provider (and mode) of ``case`` under pytest-benchmark, after the case's check."""
    if case.check is not None and key in case.checked:
        ok, desc = case.check(key)
        assert ok, desc
    row = case.csv_row(key, mode, 0.0)
    shape = " ".join(
        f"{c} {_cell(case.row[c])}" for c in ("d_in", "d_out", "tokens", "dtype") if c in case.row
    )
    benchmark.group = f"{row['op']} {row['mode']} {shape} ({'cuda' if torch.cuda.is_available() else 'cpu'})"
    benchmark.extra_info.update(provider=row["provider"], mode=row["mode"], threads=torch.get_num_threads())
    fn = case.providers[key] if mode is None else case.providers[key](mode)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
