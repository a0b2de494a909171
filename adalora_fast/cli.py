"""The ``adalora-fast`` command (also ``python -m adalora_fast``): ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import sys

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    steps = args.steps if args.steps is not None else (40 if args.quick else 200)
    result = run_demo(args.out, device=args.device, steps=steps, seed=args.seed)
    if result.merged_max_diff > 1e-3:
        print("merged and unmerged outputs disagree", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_suite

    return run_suite(args.out, quick=args.quick, only=args.only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adalora-fast", description="adalora_fast: a fast, PEFT-exact AdaLoRA runtime"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train AdaLoRA on a small Llama to match a teacher with planted low-rank updates; "
        "print and plot the rank allocation",
        description="Builds a small Llama from a config (no downloads), plants low-rank updates in a few "
        "modules of a teacher copy, trains AdaLoRA on every linear layer to match it, prints the final "
        "rank allocation, saves a heatmap PNG and the adapter (PEFT format) into --out, and checks that "
        "merged and unmerged outputs agree.",
    )
    demo.add_argument("--out", default="adalora_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--device", default=_default_device(), choices=["cpu", "cuda"])
    demo.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 200; 40 with --quick)"
    )
    demo.add_argument("--quick", action="store_true", help="a short run (CI)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite on this machine; print a markdown table, write CSVs and a plot",
        description="Runs the benchmark scripts of a source checkout (benchmarks/): GPU providers when "
        "CUDA is present, CPU comparisons with PEFT always. Appends their rows to CSV files in --out, "
        "prints the rows of this run as a markdown table and saves a plot of the adapted layer's "
        "overhead over the frozen base against tokens and rank.",
    )
    bench.add_argument(
        "--out", default="adalora_bench", help="folder of the CSVs and the plot (default: %(default)s)"
    )
    bench.add_argument("--quick", action="store_true", help="each benchmark's short run")
    bench.add_argument("--only", nargs="+", default=None, metavar="NAME",
                       help="run only these benchmarks (e.g. svd_linear allocator)")  # fmt: skip
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
