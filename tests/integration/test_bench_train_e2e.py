"""Smoke test of benchmarks/bench_train_e2e.py: its main() on a tiny model, every provider, no CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import bench_train_e2e

    return bench_train_e2e


TINY = [
    "--layers",
    "1",
    "--hidden",
    "64",
    "--intermediate",
    "96",
    "--vocab",
    "64",
    "--batch",
    "1",
    "--seq",
    "16",
]


def test_main_quick_tiny(bench, capsys):
    pytest.importorskip("peft")
    argv = ["--device", "cpu", "--quick", "--no-csv", "--iters", "2", "--cpu-warmup", "0", *TINY]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for provider in bench.PROVIDERS:
        assert f"| {provider} | fwd" in out
    assert "loss parity ours vs peft_adalora" in out and ": OK" in out
    assert out.count("GOAL train_e2e") == 2


def test_rows_and_shape_label(bench):
    args = bench.parse_args(["--device", "cpu", *TINY])
    assert not args.preset and args.model["hidden"] == 64
    rows = bench.rows({"frozen": 2.0, "adalora_fast": 3.0}, args)
    assert [r["provider"] for r in rows] == ["frozen", "adalora_fast"]
    assert rows[0]["op"] == "train_e2e 1L h64 i96 v64 b1x16" and rows[0]["r"] is None
    assert rows[1]["mode"] == "fwd+bwd+step" and rows[1]["tokens"] == 16 and rows[1]["r"] == 12
    full = bench.parse_args(["--device", "cpu"])
    assert full.preset and full.model == bench.CPU_MODEL
    quick = bench.parse_args(["--device", "cpu", "--quick"])
    assert not quick.preset and quick.model == bench.CPU_QUICK_MODEL
