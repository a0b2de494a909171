"""Where the fused paths spend their GPU time: per-kernel breakdowns and component timings (CUDA only).

The benchmark scripts time whole calls against PEFT; this one says why a call costs what it does,
so the next kernel change can be planned from data rather than guesses:

* ``svd_linear``: at one layer shape (default: the goal point 4096->4096, 8192 tokens, r 12, bf16
  base, fp32 adapters), ``do_bench`` medians of every piece of the fused forward and backward next
  to cuBLAS doing the same GEMMs (``x_at``, ``xw_plus_sb`` with S given, ``xt_s``), of the whole
  layer (fused and base, fwd / bwd / fwd+bwd), and of a "cuBLAS + low-rank" composite (S by
  ``x_at``, the low-rank product in PyTorch, the base GEMM as ``addmm`` with it as C) — the design
  alternative; then a ``torch.profiler`` table of one fused fwd+bwd (CUDA time per kernel per call);
* ``orth_reg`` and ``update_and_allocate`` on the Llama-7B adapter set (harness.GPU_ADAPTERS): the
  profiler's CUDA kernel time per call next to the ``do_bench`` wall time, i.e. how much of a call
  is device work and how much is host overhead (Python, autograd, launches).

    python benchmarks/profile_gpu.py [--out DIR] [--only svd_linear orth_reg allocator]

Rows ``section,name,ms`` go to ``<out>/gpu_profile.csv`` (with the environment columns); the
tables are printed. Timings are medians of ``triton.testing.do_bench`` (warmup 10 ms, rep 50 ms).
"""

from __future__ import annotations

import argparse
import csv
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import (
    GPU_ADAPTERS,
    environment,
    force_compiled_triton,
    free_memory,
    gpu_median_ms,
    make_adapters,
    sigterm_as_interrupt,
)

WARMUP, REP = 10, 50
SECTIONS = ("svd_linear", "orth_reg", "allocator")
DEVICE = "cuda"  # --smoke: "cpu", tiny shapes, each timed call run once (catches API slips, no GPU)
ADAPTERS = GPU_ADAPTERS


class Rows:
    """Collected ``(section, name, ms)`` rows, printed as they come."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def add(self, section: str, name: str, ms: float) -> None:
        self.rows.append((section, name, ms))
        print(f"  {section:10s} {name:48s} {ms * 1e3:10.1f} us", flush=True)

    def time(self, section: str, name: str, fn: Callable[[], Any]) -> None:
        if DEVICE == "cpu":
            fn()
            return
        self.add(section, name, gpu_median_ms(fn, warmup=WARMUP, rep=REP))

    def write(self, path: Path) -> None:
        env = environment()
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["section", "name", "ms", *env.keys()])
            for section, name, ms in self.rows:
                w.writerow([section, name, f"{ms:.6g}", *env.values()])


def kernel_table(fn: Callable[[], Any], calls: int = 5, top: int = 14) -> float:
    """Profile ``calls`` calls of ``fn``; print CUDA time per kernel per call; return the total (ms)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if DEVICE == "cpu":
        return 0.0
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, tuple[float, int]] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us, n = per_kernel.get(evt.name, (0.0, 0))
        per_kernel[evt.name] = (us + evt.device_time, n + 1)
    total = sum(us for us, _ in per_kernel.values()) / calls
    print(f"    {'kernel':70s} {'us/call':>9s} {'launches/call':>13s}")
    for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {name[:70]:70s} {us / calls:9.1f} {n / calls:13.1f}")
    launches = sum(n for _, n in per_kernel.values()) / calls
    print(f"    {'TOTAL device time per call':70s} {total:9.1f} {launches:13.1f}")
    return total / 1e3


def host_table(fn: Callable[[], Any], calls: int = 50, top: int = 15) -> float:
    """Median host time of ``fn()`` (ms): the time to enqueue its work, the device not awaited
    (synchronised every 10 calls so the launch queue never fills). Then cProfile's ``top`` functions
    by own time over ``calls`` calls: where the Python and launch overhead goes."""
    import cProfile
    import pstats
    import statistics
    import time

    times = []
    for i in range(calls):
        if i % 10 == 0 and DEVICE == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    if top:
        prof = cProfile.Profile()
        prof.runcall(lambda: [fn() for _ in range(calls)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    return statistics.median(times) * 1e3


# ---- svd_linear ---------------------------------------------------------------------------------
def profile_svd_linear(rows: Rows, d_in: int, d_out: int, tokens: int, r: int) -> None:
    from adalora_fast.kernels.x_at import x_at
    from adalora_fast.kernels.xt_s import xt_s
    from adalora_fast.kernels.xw_plus_sb import xw_plus_sb

    from adalora_fast import SVDLinear

    sec = "svd_linear"
    print(f"\n## svd_linear {d_in}->{d_out}, {tokens} tokens, r {r}, bf16 base, fp32 adapters")
    dev, dt = DEVICE, (torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, d_in, device=dev, dtype=dt, generator=g)
    dy = torch.randn(tokens, d_out, device=dev, dtype=dt, generator=g)
    base = torch.nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dt).requires_grad_(False)
    W = base.weight
    layer = SVDLinear(base, r=r, lora_alpha=float(r), lora_dropout=0.0, backend="triton").train()
    with torch.no_grad():
        layer.lora_A.normal_(0, d_in**-0.5, generator=g)
        layer.lora_E.normal_(0, 1, generator=g)
        layer.lora_B.normal_(0, r**-0.5, generator=g)
    A, E, B, ranknum = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach(), layer.ranknum
    scaling = float(r)
    lam = (E.t() * (scaling / (ranknum.float() + 1e-5))).float()  # (1, r)
    s = x_at(x, A)
    gm = x_at(dy, B.t())

    rows.time(sec, "cublas fwd  x @ W.T", lambda: x @ W.t())
    rows.time(sec, "cublas dx   dy @ W", lambda: dy @ W)
    rows.time(
        sec, "xw_plus_sb fwd (S given)", lambda: xw_plus_sb(x, W.t(), None, s, B.t(), E, ranknum, scaling)
    )  # noqa: E501
    rows.time(sec, "xw_plus_sb dx (G given)", lambda: xw_plus_sb(dy, W, None, gm, A, E, ranknum, scaling))
    rows.time(sec, "x_at  S = x A^T", lambda: x_at(x, A))
    rows.time(sec, "x_at  G = dy B", lambda: x_at(dy, B.t()))
    rows.time(sec, "xt_s  dA = (G lam)^T x", lambda: xt_s(x, gm, E, ranknum, scaling))
    rows.time(sec, "xt_s  dB^T = (S lam)^T dy", lambda: xt_s(dy, s, E, ranknum, scaling))
    rows.time(sec, "torch dE = sum(G * S)", lambda: (gm * s).sum(0))
    # the opt-in kernels, each beside what it replaces
    from adalora_fast.kernels.xt_s import xt_s_dlambda
    from adalora_fast.kernels.xw_plus_sb_tma import launch_xw_plus_sb_tma, tma_reason

    fold = lambda: xt_s_dlambda(x, gm, s, E, ranknum, scaling)  # noqa: E731
    rows.time(sec, "xt_s_dlambda  dA and dE in one launch", fold)
    if tma_reason(x, W.t(), s) is None:
        fwd_tma = lambda: launch_xw_plus_sb_tma(x, W.t(), None, s, B.t(), E, ranknum, scaling, None, 0.0)  # noqa: E731
        dx_tma = lambda: launch_xw_plus_sb_tma(dy, W, None, gm, A, E, ranknum, scaling, None, 0.0)  # noqa: E731
        rows.time(sec, "xw_plus_sb_tma fwd (S given)", fwd_tma)
        rows.time(sec, "xw_plus_sb_tma dx (G given)", dx_tma)
    else:
        print(f"  xw_plus_sb_tma not timed: {tma_reason(x, W.t(), s)}")
    # x_at's grid has only M / BLOCK_M programs (128 at 8,192 tokens): a tile sweep for the next change
    for tiles in ((64, 64, 8), (32, 64, 4), (16, 64, 4), (32, 128, 4), (16, 128, 4), (128, 64, 8)):
        name = "x".join(map(str, tiles[:2])) + f"/{tiles[2]}w"
        rows.time(sec, f"x_at  S = x A^T, tiles {name}", lambda t=tiles: x_at(x, A, tiles=t))
        rows.time(sec, f"x_at  G = dy B, tiles {name}", lambda t=tiles: x_at(dy, B.t(), tiles=t))
    # the cuBLAS + low-rank alternative, piece by piece and as one composite
    t = ((s * lam) @ B.t()).to(dt)
    u = ((gm * lam) @ A).to(dt)
    rows.time(sec, "torch T = (S lam) B^T -> bf16", lambda: ((s * lam) @ B.t()).to(dt))
    rows.time(sec, "cublas addmm(T, x, W.T)", lambda: torch.addmm(t, x, W.t()))
    rows.time(sec, "cublas addmm(U, dy, W)", lambda: torch.addmm(u, dy, W))

    def hybrid_fwd() -> torch.Tensor:
        s_ = x_at(x, A)
        return torch.addmm(((s_ * lam) @ B.t()).to(dt), x, W.t())

    def hybrid_bwd() -> None:
        g_ = x_at(dy, B.t())
        torch.addmm(((g_ * lam) @ A).to(dt), dy, W)
        xt_s(x, g_, E, ranknum, scaling)
        xt_s(dy, s, E, ranknum, scaling)
        (g_ * s).sum(0)

    rows.time(sec, "composite cublas+lowrank fwd", hybrid_fwd)
    rows.time(sec, "composite cublas+lowrank bwd", hybrid_bwd)

    xg = x.clone().requires_grad_(True)
    params = [xg, layer.lora_A, layer.lora_E, layer.lora_B]

    def zero() -> None:
        for p in params:
            p.grad = None

    def fused_fwd() -> None:
        zero()
        layer(xg)

    def fused_fwd_bwd() -> None:
        zero()
        layer(xg).backward(dy)

    def base_fwd_bwd() -> None:
        xg.grad = None
        base(xg).backward(dy)

    rows.time(sec, "layer base fwd", lambda: base(xg))
    rows.time(sec, "layer base fwd+bwd", base_fwd_bwd)
    rows.time(sec, "layer fused fwd", fused_fwd)
    rows.time(sec, "layer fused fwd+bwd", fused_fwd_bwd)
    print("\n  fused fwd+bwd, CUDA time per kernel:")
    rows.add(sec, "profiler fused fwd+bwd device total", kernel_table(fused_fwd_bwd))
    print("\n  base fwd+bwd, CUDA time per kernel:")
    rows.add(sec, "profiler base fwd+bwd device total", kernel_table(base_fwd_bwd, top=5))
    print("\n  fused fwd+bwd, host side:")
    rows.add(sec, "host fused fwd+bwd (enqueue time)", host_table(fused_fwd_bwd))
    rows.add(sec, "host base fwd+bwd (enqueue time)", host_table(base_fwd_bwd, top=0))


# ---- orth_reg and update_and_allocate -----------------------------------------------------------
def profile_orth_reg(rows: Rows) -> None:
    import adalora_fast as af

    sec = "orth_reg"
    m = ADAPTERS
    print(f"\n## orth_reg fwd+bwd, {m}")
    named = make_adapters(m["layers"], m["d"], m["d_ff"], m["r"], DEVICE)
    As = [p for n, p in named if ".lora_A." in n]
    Bs = [p for n, p in named if ".lora_B." in n]
    params = As + Bs

    def step(backend: str) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            af.orth_regularization(As, Bs, backend=backend).backward()

        return run

    for backend in ("triton", "torch"):
        rows.time(sec, f"{backend} fwd+bwd wall (do_bench)", step(backend))
        print(f"\n  {backend} fwd+bwd, CUDA time per kernel:")
        rows.add(sec, f"{backend} fwd+bwd device total", kernel_table(step(backend)))
        rows.add(sec, f"{backend} fwd+bwd host (enqueue time)", host_table(step(backend), calls=20, top=0))
    with torch.no_grad():
        rows.time(sec, "triton fwd only, no autograd", lambda: af.orth_regularization(As, Bs, "triton"))


def profile_allocator(rows: Rows) -> None:
    from bench_allocator import Ours, draw_grads, initial_values

    sec = "allocator"
    m = ADAPTERS
    print(f"\n## update_and_allocate (mask step), {m}")
    init = initial_values(m["layers"], m["d"], m["d_ff"], m["r"], DEVICE)
    grads = draw_grads(init, torch.Generator(device=DEVICE).manual_seed(1))
    for provider, backend in (("fused", "triton"), ("torch", "torch")):
        ours = Ours(backend, init, target_r=8)
        for (module, kind), grad in grads.items():
            ours.param(module, kind).grad = grad
        ours()  # tables, compiles
        rows.time(sec, f"{provider} wall (do_bench)", ours)
        print(f"\n  {provider}, CUDA time per kernel:")
        rows.add(sec, f"{provider} device total", kernel_table(ours))
        print(f"\n  {provider}, host side:")
        rows.add(sec, f"{provider} host (enqueue time)", host_table(ours, calls=20, top=12))
        del ours
        free_memory()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_profile.csv")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--shape", type=int, nargs=4, default=(4096, 4096, 8192, 12),
                        metavar=("D_IN", "D_OUT", "TOKENS", "R"))  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no timing (interpreter)")
    args = parser.parse_args(argv)
    if args.smoke:
        global DEVICE, ADAPTERS
        DEVICE, ADAPTERS = "cpu", {"layers": 2, "d": 32, "d_ff": 48, "r": 12}
        args.shape = (32, 48, 40, 4)
    elif not torch.cuda.is_available():
        print("profile_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    if not args.smoke:
        force_compiled_triton()
    sigterm_as_interrupt()
    print(f"device {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, torch {torch.__version__}")
    rows, failed = Rows(), []
    jobs = {
        "svd_linear": lambda: profile_svd_linear(rows, *args.shape),
        "orth_reg": lambda: profile_orth_reg(rows),
        "allocator": lambda: profile_allocator(rows),
    }
    try:
        for name in args.only:
            try:
                jobs[name]()
            except Exception as err:  # one section's failure must not hide the others' numbers
                failed.append(f"{name}: {type(err).__name__}: {err}")
                traceback.print_exc()
            free_memory()
    except KeyboardInterrupt:
        failed.append("interrupted")
    finally:
        out = Path(args.out).expanduser().resolve() / "gpu_profile.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        rows.write(out)
        print(f"CSV: {out}")
    for msg in failed:
        print(f"FAILED {msg}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
