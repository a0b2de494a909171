"""Shared helpers for the project's benchmarks: tiny models, timers, and the results CSV.

Every benchmark appends its measurements to a CSV under ``benchmarks/results/`` with the columns in
:data:`COLUMNS` (``docs/numeric_contract.md`` §6). The environment columns (gpu, torch, triton, commit, date)
are filled in here; a benchmark passes the others and leaves the ones that do not apply out (they
are written as empty strings).

Timers: :func:`time_cpu` (median of wall times, for CPU runs and standalone scripts),
:func:`time_cpu_interleaved` (round-robin over several callables, for fair ratios on a shared
machine) and :func:`gpu_median_ms` (``triton.testing.do_bench``, median, CUDA only; triton is
imported lazily).

Per-layer benchmarks (one layer-like callable ``fn(x) -> y``): :func:`frozen_linear` and
:func:`layer_inputs` build a frozen base layer and its (x, dy); :func:`layer_step` builds the timed
closure of one mode of :data:`MODES` (``fwd``: forward with autograd recording, as in training, the
output discarded; ``bwd``: backward alone through a graph recorded once; ``fwd+bwd``: both), each
closure setting the given gradients to None first, as ``zero_grad(set_to_none=True)`` does, so
nothing accumulates from call to call. :func:`time_layer_gpu` times the modes of one layer one after
the other with :func:`gpu_median_ms`, :func:`time_layers_cpu` several layers round-robin with
:func:`time_cpu_interleaved`; :func:`free_memory` releases what a finished configuration held and
:func:`overhead_pct` / :func:`fmt_overhead` give the overhead over a baseline.

Cross-layer benchmarks (the allocator, the regulariser): :func:`make_adapters` builds a
Llama-shaped set of PEFT-named adapter parameters without any base weight (:func:`projection_shapes`);
:func:`op_counts` counts the ATen ops (views excluded, :data:`VIEW_OPS`) and, on CUDA, the GPU kernels
of one call; :func:`max_rel_err` compares results; :func:`force_compiled_triton` makes sure a CUDA
run compiles the Triton kernels rather than interpreting them; :func:`sigterm_as_interrupt` lets a
script stopped by ``timeout`` write what it measured.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

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
    "gpu",
    "torch",
    "triton",
    "commit",
    "date",
)
ENV_COLUMNS = ("gpu", "torch", "triton", "commit", "date")

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_ADAPTER = "default"  # PEFT's adapter name: parameters are named <module>.lora_A.default etc.
VIEW_OPS = {
    "aten::alias", "aten::as_strided", "aten::detach", "aten::expand", "aten::narrow", "aten::reshape",
    "aten::_reshape_alias", "aten::select", "aten::slice", "aten::split", "aten::split_with_sizes",
    "aten::squeeze", "aten::t", "aten::transpose", "aten::unsqueeze", "aten::view", "aten::_unsafe_view",
    "aten::lift_fresh", "aten::numpy_T", "aten::unflatten_dense_tensors",
}  # fmt: skip


# ---- models -------------------------------------------------------------------------------------
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
    """A randomly initialised ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no downloads).

    ``heads`` defaults to ``hidden // 64`` (at least 1) and ``kv_heads`` to ``heads`` (plain
    multi-head attention, so q/k/v/o are all hidden x hidden). One ``seed`` gives the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = heads if heads is not None else max(1, hidden // 64)
    kv_heads = kv_heads if kv_heads is not None else heads
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden={hidden}, heads={heads}, kv_heads={kv_heads} do not divide")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype)


# ---- adapters without base weights -------------------------------------------------------------
def projection_shapes(d: int, d_ff: int) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each Llama projection: q, k, v, o d -> d; gate, up d -> d_ff; down d_ff -> d."""
    return {
        "q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
        "gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d),
    }  # fmt: skip


# Adapter sets of the allocator and regulariser benchmarks (make_adapters arguments): Llama-7B's
# 32 layers x 7 projections on GPUs; the CPU goal shape (d = 512) on the CPU.
GPU_ADAPTERS = {"layers": 32, "d": 4096, "d_ff": 11008, "r": 12}
CPU_ADAPTERS = {"layers": 32, "d": 512, "d_ff": 1376, "r": 12}


def make_adapters(
    layers: int,
    d: int,
    d_ff: int,
    r: int,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[tuple[str, torch.nn.Parameter]]:
    """PEFT-named adapter parameters ``[(name, p)]`` of a Llama-shaped model, no base weights.

    ``layers`` x the 7 projections of :data:`LLAMA_PROJ` (:func:`projection_shapes`), named
    ``base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.<kind>.default`` and listed in the
    order of PEFT's ``named_parameters()`` (per module: lora_A r x d_in, lora_B d_out x r, lora_E
    r x 1). Random non-zero values drawn from ``seed``: A and B ~ N(0, 0.02) (PEFT's init), E ~ N(0, 1)
    (a trained E: PEFT's zero init would zero every E score).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = projection_shapes(d, d_ff)
    named = []
    for i in range(layers):
        for proj in LLAMA_PROJ:
            d_in, d_out = shapes[proj]
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
            kinds = (("lora_A", (r, d_in), 0.02), ("lora_B", (d_out, r), 0.02), ("lora_E", (r, 1), 1.0))
            for kind, shape, std in kinds:
                t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
                named.append((f"{prefix}.{kind}.{PEFT_ADAPTER}", torch.nn.Parameter(t.to(dtype))))
    return named


# ---- environment --------------------------------------------------------------------------------
def gpu_name() -> str:
    """``torch.cuda.get_device_name()``, or "cpu" without CUDA."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


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


def utc_date() -> str:
    """Today's date in UTC, ISO format (YYYY-MM-DD)."""
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def environment() -> dict[str, str]:
    """The environment columns of a results row."""
    return {
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "date": utc_date(),
    }


def describe_environment() -> str:
    """One line for a benchmark's printed output."""
    env = environment()
    return (
        f"device={env['gpu']} torch={env['torch']} triton={env['triton'] or '-'} "
        f"threads={torch.get_num_threads()} commit={env['commit']} date={env['date']}"
    )


# ---- results CSV --------------------------------------------------------------------------------
def results_path(csv_path: str | Path) -> Path:
    """A bare or relative name lands under ``benchmarks/results/``; absolute paths are kept."""
    p = Path(csv_path)
    return p if p.is_absolute() else RESULTS_DIR / p


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def append_rows(csv_path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Append ``rows`` (dicts keyed by :data:`COLUMNS`) to a CSV under ``benchmarks/results/``.

    Missing environment columns are filled in (:func:`environment`); other missing columns are
    written as empty strings; unknown keys raise ``ValueError``. The header is written when the file
    is new; an existing file whose header differs from :data:`COLUMNS` raises ``ValueError``.
    Returns the path written.
    """
    path = results_path(csv_path)
    rows = list(rows)
    env = environment()
    out_rows = []
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}; allowed: {COLUMNS}")
        full = {c: _cell(row.get(c)) for c in COLUMNS}
        for c in ENV_COLUMNS:
            if c not in row:
                full[c] = env[c]
        out_rows.append(full)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path} has header {header}, expected {list(COLUMNS)}")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(out_rows)
    return path


# ---- timers -------------------------------------------------------------------------------------
def time_cpu(fn: Callable[[], Any], warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds (``time.perf_counter``, one call per sample).

    CUDA work is synchronised around each call when CUDA is available, so it is usable as a rough
    timer there too; prefer :func:`gpu_median_ms` for GPU numbers.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    gc.collect()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_cpu_interleaved(
    fns: Mapping[str, Callable[[], Any]], warmup: int = 3, iters: int = 20
) -> dict[str, list[float]]:
    """Wall times in milliseconds of several callables, measured round-robin.

    Each round calls every function once (the order rotates from round to round), so that load from
    other processes on a shared machine hits all of them alike. Returns ``{name: [ms per call]}``;
    take :func:`statistics.median` of each list for the reported number.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def gpu_median_ms(
    fn: Callable[[], Any], warmup: int = 25, rep: int = 100, min_samples: int = 1, **kwargs: Any
) -> float:
    """Median time of ``fn()`` on the GPU in milliseconds via ``triton.testing.do_bench``.

    ``warmup`` and ``rep`` are in milliseconds (do_bench's meaning); extra keyword arguments (e.g.
    ``grad_to_none``) go to do_bench. do_bench times ``rep / (its estimate of one call)`` calls, so a
    slow ``fn`` (longer than ``rep``) would get a single sample: with ``min_samples`` > 1, ``fn`` is
    first timed on its own (:func:`time_cpu`, 1 + 3 synchronised calls) and ``rep`` raised to
    ``min_samples`` times that. Raises ``RuntimeError`` without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_median_ms needs a CUDA device; use time_cpu on the CPU")
    from triton.testing import do_bench

    if min_samples > 1:
        rep = max(rep, math.ceil(min_samples * time_cpu(fn, warmup=1, iters=3)))

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median", **kwargs))


# ---- per-layer benchmarks -----------------------------------------------------------------------
MODES = ("fwd", "bwd", "fwd+bwd")


def frozen_linear(
    d_in: int, d_out: int, device: str | torch.device, dtype: torch.dtype, seed: int = 0, bias: bool = False
) -> torch.nn.Linear:
    """A frozen ``nn.Linear(d_in, d_out)`` (the base of an adapted layer), built on ``device``."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out, bias=bias, device=device, dtype=dtype)
    return base.requires_grad_(False)


def layer_inputs(
    tokens: int, d_in: int, d_out: int, device: str | torch.device, dtype: torch.dtype, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dy)``: random activations (tokens, d_in) that require grad, and an output gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, generator=g).requires_grad_(True)
    dy = torch.randn(tokens, d_out, device=device, dtype=dtype, generator=g)
    return x, dy


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks (between configurations, after failures)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


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
    """The timed closure of ``mode`` (one of :data:`MODES`) for the layer-like callable ``fn``.

    ``x`` is the input (it should require grad, as activations do in training), ``dy`` the output
    gradient, ``grads`` the tensors whose ``.grad`` each call sets to None first (x and the trainable
    parameters), so that gradients never accumulate across calls. ``fwd`` runs ``fn(x)`` with grad
    enabled and drops the output (and its graph); ``bwd`` records the graph once, here, and each
    call runs ``y.backward(dy, retain_graph=True)``: the closure holds that graph until it is
    dropped; ``fwd+bwd`` runs ``fn(x).backward(dy)``.
    """
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


def time_layer_gpu(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    dy: torch.Tensor,
    grads: Sequence[torch.Tensor] = (),
    modes: Sequence[str] = MODES,
    warmup: int = 25,
    rep: int = 100,
) -> dict[str, float]:
    """``{mode: median ms}`` of one layer on the GPU, the modes timed one after the other.

    Each mode's closure (and, for ``bwd``, its recorded graph) is dropped before the next mode is
    built, and the gradients it made are set to None afterwards.
    """
    out: dict[str, float] = {}
    for mode in modes:
        step = layer_step(mode, fn, x, dy, grads)
        try:
            out[mode] = gpu_median_ms(step, warmup=warmup, rep=rep)
        finally:
            del step
            _set_none(grads)
    return out


def time_layers_cpu(
    fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    dy: torch.Tensor,
    grads: Mapping[str, Sequence[torch.Tensor]],
    mode: str,
    warmup: int = 3,
    iters: int = 20,
) -> dict[str, list[float]]:
    """Wall times (ms per call) of one mode of several layers, round-robin (:func:`time_cpu_interleaved`).

    ``grads[name]`` are the tensors whose gradients the closure of layer ``name`` sets to None.
    """
    steps = {name: layer_step(mode, fn, x, dy, grads.get(name, ())) for name, fn in fns.items()}
    try:
        return time_cpu_interleaved(steps, warmup=warmup, iters=iters)
    finally:
        del steps
        for g in grads.values():
            _set_none(g)


def overhead_pct(ms: float | None, base_ms: float | None) -> float | None:
    """``(ms / base_ms - 1) * 100``, or None when either is missing (or the base is not positive)."""
    if ms is None or base_ms is None or base_ms <= 0:
        return None
    return (ms / base_ms - 1.0) * 100.0


def fmt_overhead(ms: float | None, base_ms: float | None) -> str:
    """Overhead over the baseline as "+12.3%" ("-" when it cannot be computed)."""
    pct = overhead_pct(ms, base_ms)
    return "-" if pct is None else f"{pct:+.1f}%"


# ---- op counts, comparisons, Triton mode --------------------------------------------------------
def op_counts(fn: Callable[[], Any], cuda: bool = False) -> tuple[int, int | None]:
    """``(ATen ops other than views, GPU kernels)`` of one ``fn()`` call, from ``torch.profiler``.

    ATen ops are the CPU-side ``aten::*`` events not in :data:`VIEW_OPS` (nested ones included, as
    the profiler records them). With ``cuda=True`` (and CUDA available) the GPU activity is recorded
    too and the kernels run on the device are counted (Triton kernels included; memory copies and sets
    left out); otherwise the second value is None.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = cuda and torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    aten = sum(
        1
        for e in events
        if e.device_type == DeviceType.CPU and e.name.startswith("aten::") and e.name not in VIEW_OPS
    )
    if not cuda:
        return aten, None
    copies = ("Memcpy", "Memset", "memcpy", "memset")
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(copies))
    return aten, kernels


def max_rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """``max |a - b| / max |b|`` in fp32 (inf when a is missing or shapes differ; NaN propagates)."""
    if a is None or b is None or a.shape != b.shape:
        return float("inf")
    a, b = a.detach().float(), b.detach().float()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (what ``timeout`` sends) raise ``KeyboardInterrupt``, as Ctrl-C does, so that a
    script stopped by a deadline still writes the rows it measured and prints its verdict."""
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


def add_common_args(parser: Any) -> None:
    """The options every benchmark script shares: ``--out``, ``--warmup`` / ``--rep`` (do_bench, GPU),
    ``--threads`` and ``--no-csv``."""
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder of the CSV (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms (GPU)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms (GPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    parser.add_argument("--no-csv", action="store_true", help="print only, append no rows")


def script_start(
    out: str, no_csv: bool, threads: int, gpu_csv: str, cpu_csv: str
) -> tuple[bool, Path | None]:
    """The common start of a benchmark script: SIGTERM stops like Ctrl-C, the CPU thread count, and
    the CSV to append to (``gpu_csv`` on CUDA, ``cpu_csv`` otherwise; None with ``no_csv``).
    Returns (cuda, csv path)."""
    sigterm_as_interrupt()
    cuda = torch.cuda.is_available()
    if threads > 0:
        torch.set_num_threads(threads)
    csv_path = None if no_csv else Path(out).expanduser().resolve() / (gpu_csv if cuda else cpu_csv)
    return cuda, csv_path


def script_end(failures: Sequence[str], csv_path: Path | None) -> int:
    """The common end of a benchmark script: where the rows went, the failures; the exit code."""
    if csv_path is not None:
        print(f"CSV: {csv_path}")
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for msg in failures:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0
