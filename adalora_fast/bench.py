"""``adalora-fast bench``: run the benchmark suite of a source checkout and summarise it.

Each script in ``benchmarks/`` picks its providers from the machine (fused Triton kernels on CUDA;
the torch path and PEFT everywhere) and appends rows with the shared columns of
``benchmarks/harness.py`` to a CSV in the output folder. This runner starts them one after the other,
then prints the rows of this run as one markdown table and plots the adapted layer's overhead over
the frozen base (``svd_linear`` rows) against tokens and rank.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

# name -> extra arguments for a quick run (every script takes --out)
SUITE: dict[str, list[str]] = {
    "svd_linear": ["--quick", "--iters", "10"],
    "allocator": ["--quick"],
    "orth_reg": ["--iters", "5"],
    "inference": ["--quick"],
    "train_e2e": ["--quick"],
}
PLOT_NAME = "svd_linear_overhead.png"


def benchmarks_dir() -> Path:
    """``benchmarks/`` next to the package (a source checkout with ``pip install -e .``)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (folder / "harness.py").is_file():
        raise SystemExit(
            "adalora-fast bench runs the scripts in benchmarks/ of a source checkout: "
            "git clone the repository and pip install -e '.[dev]' there"
        )
    return folder


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _shape(row: dict[str, str]) -> str:
    if row.get("d_in") and row.get("d_out"):
        return f"{row['d_in']}→{row['d_out']}, {row.get('tokens') or '-'} tok"
    return "-"


def _group(row: dict[str, str]) -> tuple:
    """The measurement a row belongs to, apart from its provider and rank."""
    return (row["op"], row["mode"], row.get("d_in"), row.get("d_out"), row.get("tokens"), row.get("dtype"))


def markdown_summary(rows: list[dict[str, str]]) -> str:
    """One line per measurement: op, mode, shape, r, dtype, provider, median ms, and the ratio to the
    ``base`` (frozen layer) or ``peft`` row of the same op / mode / shape where there is one."""
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        try:
            groups[_group(row)][f"{row['provider']}|{row.get('r') or ''}"] = float(row["median_ms"])
        except (KeyError, ValueError):
            continue
    lines = [
        "| op | mode | shape | r | dtype | provider | median ms | vs base | PEFT / this |",
        "|---|---|---|---:|---|---|---:|---:|---:|",
    ]
    for row in rows:
        key = _group(row)
        try:
            ms = float(row["median_ms"])
        except (KeyError, ValueError):
            continue
        r = row.get("r") or ""
        base = groups[key].get("base|")
        peft = groups[key].get(f"peft|{r}")
        vs_base = f"{ms / base:.2f}×" if base and row["provider"] != "base" else ""
        vs_peft = f"{peft / ms:.1f}×" if peft and row["provider"] != "peft" else ""
        lines.append(
            f"| {row['op']} | {row['mode']} | {_shape(row)} | {r or '-'} | {row.get('dtype', '')} | "
            f"{row['provider']} | {ms:.3f} | {vs_base} | {vs_peft} |"
        )
    return "\n".join(lines)


def plot_overhead(rows: list[dict[str, str]], path: Path) -> Path | None:
    """Overhead (%) of each adapter provider over the frozen base in ``fwd+bwd`` against tokens (one
    line per rank) and against rank (one line per token count), from ``svd_linear`` rows. None without
    such rows or without matplotlib."""
    points: dict[tuple[str, int, int], float] = {}
    bases: dict[tuple, float] = {}
    for row in rows:
        if row.get("op") != "svd_linear" or row.get("mode") != "fwd+bwd":
            continue
        shape = (row["d_in"], row["d_out"], int(row["tokens"]), row["dtype"])
        if row["provider"] == "base":
            bases[shape] = float(row["median_ms"])
    for row in rows:
        if row.get("op") != "svd_linear" or row.get("mode") != "fwd+bwd" or row["provider"] == "base":
            continue
        shape = (row["d_in"], row["d_out"], int(row["tokens"]), row["dtype"])
        if shape in bases and row.get("r"):
            label = f"{row['provider']} {row['d_in']}→{row['d_out']}"
            points[(label, int(row["tokens"]), int(row["r"]))] = 100 * (
                float(row["median_ms"]) / bases[shape] - 1
            )
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (by_tokens, by_rank) = plt.subplots(1, 2, figsize=(11, 4))
    labels = sorted({label for label, _, _ in points})
    for label in labels:
        for r in sorted({r for lab, _, r in points if lab == label}):
            xs = sorted(t for lab, t, rr in points if lab == label and rr == r)
            by_tokens.plot(xs, [points[(label, t, r)] for t in xs], marker="o", label=f"{label}, r {r}")
        for t in sorted({t for lab, t, _ in points if lab == label}):
            xs = sorted(r for lab, tt, r in points if lab == label and tt == t)
            by_rank.plot(xs, [points[(label, t, r)] for r in xs], marker="o", label=f"{label}, {t} tok")
    by_tokens.set(xlabel="tokens", ylabel="overhead over the frozen base, fwd+bwd (%)", xscale="log")
    by_rank.set(xlabel="rank r", ylabel="overhead over the frozen base, fwd+bwd (%)")
    for ax in (by_tokens, by_rank):
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("adapted linear layer: cost over the frozen base (svd_linear rows of this run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_suite(out: str | Path, quick: bool = False, only: list[str] | None = None) -> int:
    """Run the suite (or ``only`` these names); returns 1 if any script failed, else 0."""
    folder = benchmarks_dir()
    names = list(SUITE) if not only else only
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(SUITE)}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seen = {p: len(_read_rows(p)) for p in out.glob("*.csv")}
    failed = []
    for name in names:
        cmd = [sys.executable, str(folder / f"bench_{name}.py"), "--out", str(out)] + (
            SUITE[name] if quick else []
        )
        print(f"\n## {name}: {' '.join(cmd[1:])}\n", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=folder).returncode
        print(f"\n[{name}: exit code {code}, {time.perf_counter() - start:.0f} s]", flush=True)
        if code != 0:
            failed.append(name)
    rows = []
    for path in sorted(out.glob("*.csv")):
        rows += _read_rows(path)[seen.get(path, 0) :]
    print(f"\n## This run ({len(rows)} rows, CSVs in {out})\n")
    print(markdown_summary(rows))
    plot = plot_overhead(rows, out / PLOT_NAME)
    print(f"\noverhead plot: {plot}" if plot else "\nno overhead plot (no svd_linear rows, or no matplotlib)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
