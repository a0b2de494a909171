"""Host cost of one adapted layer's forward + backward on the CPU, with the Triton launches stubbed.

At small token counts the fused layer is host-bound on a GPU: its enqueue time (Python, autograd, ATen
glue, Triton's launcher) exceeds its device time. This measures the part that does not need a GPU:
every Triton launch is replaced by a stub that only records the kernel's name (so Triton's own binder
and driver are *not* counted), and the shapes are tiny (16 tokens, 64 -> 64, r 12, fp32) so that the
ATen glue costs its dispatch, not its arithmetic. Providers, side by side in one run:

- ``fused``: ``kernels/svd_linear.py``'s eager path (the autograd Function and its kernels, stubbed);
- ``fused_fold``: the same with ``ADALORA_FAST_FOLD_DLAMBDA`` (d(lambda) reduced in the dQ kernel);
- ``torch``: our PyTorch path (``functional.svd_linear`` with ``backend="torch"``, PEFT's op order);
- ``linear``: ``F.linear`` with a frozen weight, the goal's yardstick (a frozen nn.Linear's fwd+bwd);
- ``function_floor``: a Python ``torch.autograd.Function`` taking x and the three factors and
  returning their gradients, doing nothing else: what any eager Python autograd Function costs before
  its first kernel (the fused layer is one).

Per provider: the median host time of a fwd+bwd over ``--iters`` interleaved rounds (microseconds),
the ATen ops other than views (``harness.op_counts``) and the Triton launches. Goal (issue 18): the
fused layer at <= 50 us and <= 8 launches, no more than ``linear``. Rows go to
``<out>/cpu_host_path.csv`` (columns :data:`COLUMNS`).

    python benchmarks/bench_host_path.py [--out DIR] [--iters N] [--no-csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Stubbed launches need compiled-mode JIT functions: the interpreter launches through other classes.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

COLUMNS = ("op", "provider", "tokens", "d_in", "d_out", "r", "host_us", "aten_ops", "launches",
           "torch", "triton", "commit", "date")  # fmt: skip
TOKENS, D, R = 16, 64, 12
GOAL_US, GOAL_LAUNCHES = 50.0, 8
LAUNCHES: list[str] = []


def stub_triton_launches() -> None:
    """Every ``kernel[grid](...)`` (plain, autotuned, heuristics) records the kernel's name instead of
    launching it."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    def record(self, *args, **kwargs) -> None:
        fn = self
        while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
            fn = fn.fn
        LAUNCHES.append(getattr(fn, "__name__", type(fn).__name__))

    for cls in (JITFunction, Autotuner, Heuristics):
        cls.run = record


def providers() -> dict[str, Callable[[], None]]:
    """One fwd+bwd closure per provider, on the same tensors (x and the factors train, W is frozen)."""
    from adalora_fast.kernels import svd_linear as kernel

    from adalora_fast import functional

    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, D, generator=g, requires_grad=True)
    weight = torch.randn(D, D, generator=g)
    factors = [torch.randn(*s, generator=g, requires_grad=True) for s in ((R, D), (R, 1), (D, R))]
    ranknum = torch.tensor([float(R)])
    dy = torch.randn(TOKENS, D, generator=g)

    def fused() -> None:
        kernel.svd_linear(x, weight, None, *factors, ranknum, 2.0).backward(dy)

    def torch_path() -> None:
        functional.svd_linear(x, weight, None, *factors, ranknum, 2.0, backend="torch").backward(dy)

    def linear() -> None:
        torch.nn.functional.linear(x, weight).backward(dy)

    grads = [f.detach().clone() for f in factors]

    class _Floor(torch.autograd.Function):
        """A Python autograd Function with the fused layer's inputs and gradients and no work."""

        @staticmethod
        def forward(ctx, x, *_factors):  # type: ignore[override]
            return x.clone()

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return (g, *grads)

    def function_floor() -> None:
        _Floor.apply(x, *factors).backward(dy)

    fused_fold = harness.opted_in("fused_fold", fused)  # ADALORA_FAST_FOLD_DLAMBDA=1
    return {"fused": fused, "fused_fold": fused_fold, "torch": torch_path, "linear": linear,
            "function_floor": function_floor}  # fmt: skip


def measure(fns: dict[str, Callable[[], None]], iters: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, fn in fns.items():
        fn()  # warm: first-call set-up is not the steady state
        LAUNCHES.clear()
        fn()
        launches = len(LAUNCHES)
        aten, _ = harness.op_counts(fn)
        out[name] = {"launches": launches, "aten_ops": aten, "samples": []}
    for _ in range(iters):  # interleaved rounds: a shared machine's drift hits every provider alike
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(20):
                fn()
            out[name]["samples"].append((time.perf_counter() - start) / 20 * 1e6)
    for row in out.values():
        row["host_us"] = statistics.median(row.pop("samples"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="folder of cpu_host_path.csv")
    parser.add_argument("--iters", type=int, default=15, help="interleaved timing rounds (20 calls each)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    stub_triton_launches()
    torch.set_num_threads(1)  # host work is single-threaded; no thread-pool noise
    results = measure(providers(), args.iters)
    print(f"## host path, fwd+bwd, {TOKENS} tokens, {D} -> {D}, r {R}, fp32, CPU, Triton launches stubbed")
    print(harness.describe_environment())
    print("| provider | host us | ATen ops | launches |\n|---|---:|---:|---:|")
    for name, row in results.items():
        print(f"| {name} | {row['host_us']:.1f} | {row['aten_ops']} | {row['launches']} |")
    fused, linear = results["fused"], results["linear"]
    met = fused["host_us"] <= GOAL_US and fused["launches"] <= GOAL_LAUNCHES
    print(
        f"GOAL host fused fwd+bwd: {fused['host_us']:.1f} us, {fused['launches']} launches "
        f"(goal <= {GOAL_US:g} us and <= {GOAL_LAUNCHES}; linear {linear['host_us']:.1f} us): "
        f"{'MET' if met else 'MISSED'}"
    )
    if not args.no_csv:
        env = harness.environment()
        path = Path(args.out) / "cpu_host_path.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            for name, row in results.items():
                writer.writerow({
                    "op": "svd_linear_fwd_bwd", "provider": name, "tokens": TOKENS, "d_in": D, "d_out": D,
                    "r": R, "host_us": f"{row['host_us']:.2f}", "aten_ops": row["aten_ops"],
                    "launches": row["launches"], **{k: env[k] for k in ("torch", "triton", "commit", "date")},
                })  # fmt: skip
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
