"""The benchmarks' harness and providers on tiny shapes (CPU, seconds; the fused providers in Triton's
interpreter): the shared runner (the check refuses timings, the baseline is always timed, the CSV
columns), and the correctness properties the bench scripts no longer gate on themselves (each
script keeps one cheap check): the providers they time compute the same thing."""

from __future__ import annotations

import copy
import csv
import importlib
import math
from pathlib import Path

import pytest
import torch

from adalora_fast.testing import max_rel_err

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
INTERPRETED = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the fused providers need CUDA or TRITON_INTERPRET=1",
)


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return lambda name: importlib.import_module(name)


# ---- the runner -----------------------------------------------------------------------------------
def _fake(harness, check_ok: bool):
    calls = {"base": 0, "ours": 0, "peer": 0}

    def provider(key):
        return lambda: calls.__setitem__(key, calls[key] + 1)

    def setup(_config):
        return harness.Case(
            {k: provider(k) for k in calls}, {"op": "fake", "mode": "fwd", "r": 4, "dtype": torch.float32},
            baseline="base", fields={"base": {"r": None}}, check=lambda k: (check_ok, "compared"),
            checked=("ours",), reference="peer",
        )  # fmt: skip

    return calls, setup


def _args(harness, argv):
    parser = __import__("argparse").ArgumentParser()
    harness.add_common_args(parser, ("base", "ours", "peer"), iters=(3, 2), cpu_warmup=(1, 0))
    return harness.parse_args(parser, argv)


def test_runner_times_every_provider_and_writes_the_shared_columns(bench, tmp_path, capsys):
    harness = bench("harness")
    calls, setup = _fake(harness, check_ok=True)
    args = _args(harness, ["--out", str(tmp_path), "--quick", "--providers", "ours", "peer"])
    assert (args.iters, args.cpu_warmup) == (2, 0)
    goals = lambda res: [f"GOAL fake {res.get(provider='ours', op='fake'):.0f}"]  # noqa: E731
    code = harness.run(args, [0], setup, title="fake", device="cpu", csv_names=("g", "c.csv"), goals=goals)
    out = capsys.readouterr().out
    assert code == 0, out
    assert calls == {"base": 2, "ours": 2, "peer": 2}  # the baseline is timed although not asked for
    assert "check ours vs peer: compared: OK" in out and "| ours | fwd |" in out and "GOAL fake" in out
    with open(tmp_path / "c.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == harness.COLUMNS
    got = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    assert [(r["provider"], r["r"], r["dtype"]) for r in got] == [
        ("base", "", "float32"), ("ours", "4", "float32"), ("peer", "4", "float32")]  # fmt: skip
    assert all(r["gpu"] == "cpu" and r["date"] and float(r["median_ms"]) >= 0 for r in got)


def test_results_of_the_old_header_get_the_host_and_device_columns(bench, tmp_path):
    """A results CSV written before host_us / device_us: the next append rewrites its header, the old
    rows keep their values and get empty cells (nothing was measured there)."""
    harness = bench("harness")
    path = tmp_path / "old.csv"
    values = ["op1", "fwd", "base", "1", "1", "1", "", "float32", "0.5"]
    old_row = dict(zip(harness.OLD_COLUMNS, values, strict=False))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=harness.OLD_COLUMNS)
        writer.writeheader()
        writer.writerow({c: old_row.get(c, "x") for c in harness.OLD_COLUMNS})
    harness.append_rows(path, [{"op": "op2", "provider": "ours", "median_ms": 0.25, "host_us": 12.5}])
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == harness.COLUMNS
    assert rows[0]["op"] == "op1" and rows[0]["median_ms"] == "0.5" and rows[0]["host_us"] == ""
    assert rows[0]["date"] == "x"  # the old environment cells are kept
    assert rows[1]["op"] == "op2" and rows[1]["host_us"] == "12.5" and rows[1]["device_us"] == ""


def test_host_and_device_split_on_the_cpu(bench):
    """enqueue_us times a call; device_us needs CUDA (None here)."""
    harness = bench("harness")
    calls = []
    assert harness.enqueue_us(lambda: calls.append(1), iters=5) > 0 and len(calls) == 6
    assert harness.device_us(lambda: None) is None


def test_runner_refuses_to_time_a_provider_that_fails_its_check(bench, tmp_path, capsys):
    harness = bench("harness")
    calls, setup = _fake(harness, check_ok=False)
    args = _args(harness, ["--out", str(tmp_path), "--quick"])
    assert harness.run(args, [0], setup, title="fake", device="cpu", csv_names=("g.csv", "c.csv")) == 1
    captured = capsys.readouterr()
    assert calls["ours"] == 0 and calls["base"] == calls["peer"] == 2
    assert "FAILED check ours: compared; not timed" in captured.err
    with open(tmp_path / "c.csv", newline="") as f:
        assert [r["provider"] for r in csv.DictReader(f)] == ["base", "peer"]


def test_runner_gpu_path_rounds_and_failures(bench, tmp_path, monkeypatch, capsys):
    """The CUDA path with do_bench stubbed: rotating rounds, the median over rounds, a provider that
    fails is dropped from later rounds (and reported), the GPU CSV name, per-mode closures."""
    harness = bench("harness")
    seen = []

    def fake_median(fn, warmup, rep, min_samples):
        before = calls["peer"]
        fn()
        seen.append((warmup, rep, min_samples))
        if calls["peer"] > before:
            raise RuntimeError("out of memory (fake)")
        return float(len(seen))

    monkeypatch.setattr(harness, "gpu_median_ms", fake_median)
    monkeypatch.setattr(harness, "force_compiled_triton", lambda: None)
    calls, setup = _fake(harness, check_ok=True)
    args = _args(harness, ["--out", str(tmp_path), "--rounds", "3", "--min-samples", "4", "--warmup", "7"])
    code = harness.run(args, [0], setup, title="fake", device="cuda", csv_names=("g.csv", "c"))
    assert code == 1 and "FAILED peer timing: RuntimeError: out of memory" in capsys.readouterr().err
    assert calls == {"base": 3, "ours": 3, "peer": 1} and set(seen) == {(7, 100, 4)}
    with open(tmp_path / "g.csv", newline="") as f:
        ms = {r["provider"]: float(r["median_ms"]) for r in csv.DictReader(f)}
    assert ms == {"base": 5.0, "ours": 4.0}  # medians of calls (1, 5, 6) and (2, 4, 7): rotating order


# ---- svd_linear ---------------------------------------------------------------------------------
@INTERPRETED
def test_svd_linear_providers_agree_and_the_check_catches_a_difference(bench):
    """fused (interpreter), torch and PEFT layers of the bench: same y, dx, dA, dE, dB; each trains
    exactly lora_A / lora_E / lora_B; the bench's check fails a layer that differs."""
    pytest.importorskip("peft")
    b = bench("bench_svd_linear")
    base, x, dy = b.inputs(24, 40, 9, "cpu", torch.float32)
    layers = {p: b.build(p, base, 3) for p in ("fused", "torch", "peft")}
    for layer in layers.values():
        assert sorted(n.split(".")[0] for n, p in layer.named_parameters() if p.requires_grad) == [
            "lora_A", "lora_B", "lora_E"]  # fmt: skip
    assert b.fused_problem(layers["fused"], x) is None
    want = b.outputs_and_grads(layers["torch"], x, dy)
    assert set(want) == {"y", "dx", "dA", "dE", "dB"}
    for p in ("fused", "peft"):
        got = b.outputs_and_grads(layers[p], x, dy)
        for k, v in want.items():
            assert max_rel_err(got[k], v) <= 1e-4, (p, k)
    case = b.setup((24, 40, 9, (3,)), ["base", "torch", "peft"], "cpu", torch.float32)
    assert list(case.providers) == ["base", "torch r3", "peft r3"] and case.checked == ["peft r3"]
    assert case.check("peft r3")[0]
    with torch.no_grad():
        next(iter(case.providers["peft r3"].args[1].lora_E.values())).mul_(1.01)
    assert not case.check("peft r3")[0]


# ---- allocator ----------------------------------------------------------------------------------
@INTERPRETED
def test_allocator_providers_agree_and_mask_to_the_budget(bench):
    """fused (interpreter), torch and PEFT allocators of the bench, after the check steps: the same EMAs,
    kept pattern and masked E, and the kept ranks are the budget of the step (some pruned, not all)."""
    pytest.importorskip("peft")
    b = bench("bench_allocator")
    init = b.initial_values(2, 32, 48, 6, "cpu")
    built = {p: b.build(p, init, 3) for p in ("fused", "torch", "peft")}
    assert built["fused"].allocator.scorer.name == "triton"
    gen = torch.Generator().manual_seed(1)
    for step in b.CHECK_STEPS:
        grads = b.draw_grads(init, gen)
        for p in built.values():
            for (module, kind), g in grads.items():
                p.param(module, kind).grad = g
            p(step)
    for p in ("fused", "peft"):
        ok, desc = b.compare(built[p], built["torch"])
        assert ok, (p, desc)
    kept = sum(int(k.sum()) for k in built["torch"].kept().values())
    init_bgt, target_bgt = 14 * 6, 14 * 3
    assert kept == int((init_bgt - target_bgt) * (1 - b.STEP / 1000) ** 3 + target_bgt)
    assert target_bgt < kept < init_bgt


# ---- orth_reg -----------------------------------------------------------------------------------
@INTERPRETED
def test_orth_reg_providers_agree(bench, capsys):
    """fused (interpreter) and PEFT's loop give the torch path's R and every factor's gradient."""
    b = bench("bench_orth_reg")
    named = bench("harness").make_adapters(2, 32, 48, 5, "cpu")
    params = [p for n, p in named if ".lora_E." not in n]
    assert sum(".lora_A." in n for n, _ in named) == sum(".lora_B." in n for n, _ in named) == 14
    want = b.value_and_grads(b.provider_fn("torch", named), params)
    for provider in ("fused", "peft"):
        got = b.value_and_grads(b.provider_fn(provider, named), params)
        assert all(max_rel_err(g, w) <= 1e-4 for g, w in zip(got, want, strict=True)), provider
    case = b.setup({"layers": 2, "d": 32, "d_ff": 48, "r": 5}, ["fused", "torch", "peft"], "cpu")
    assert "ops peft:" in capsys.readouterr().out and list(case.providers) == ["torch", "peft"]
    assert case.check("peft")[0]


# ---- inference ----------------------------------------------------------------------------------
def test_inference_merged_models_compute_the_adapter_path(bench):
    """merged and merge_and_unload give the unmerged adapter path's logits (fp32), and their weights
    are exactly cast(W + dW) (the bench's check)."""
    b = bench("bench_inference")
    m = {"layers": 1, "hidden": 64, "intermediate": 96, "vocab": 50, "batch": 2, "seq": 7}
    case = b.setup(m, "cpu", torch.float32)
    want = case.providers["unmerged"]()
    assert not torch.equal(case.providers["base"](), want)  # the adapters matter
    for p in ("merged", "merge_and_unload"):
        assert max_rel_err(case.providers[p](), want) <= 1e-4, p
        assert case.check(p)[0], p


# ---- train_e2e / train_step_cpu -----------------------------------------------------------------
def test_training_providers_adapt_every_projection_and_give_finite_losses(bench):
    """Every training provider of bench_train_e2e (also bench_train_step_cpu's) adapts all 7
    projections of every layer, trains with finite losses, and ours and PEFT AdaLoRA agree step by
    step (longer schedules: tests/integration/test_peft_parity.py)."""
    pytest.importorskip("peft")
    b, harness = bench("bench_train_e2e"), bench("harness")
    base = harness.tiny_llama(2, 64, 96, 50, seed=0)
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    steps = {"frozen": b.FrozenStep(copy.deepcopy(base), ids)}
    for p in ("adalora_fast", "peft_adalora", "peft_lora"):
        model, update = b.adapt(copy.deepcopy(base), p, "torch")
        lora_a = [n for n, q in model.named_parameters() if q.requires_grad and "lora_A" in n.split(".")]
        assert len(lora_a) == 14, p
        steps[p] = b.OptimizerStep(model, ids, update)
    for _ in range(3):
        for step in steps.values():
            step()
    assert all(math.isfinite(float(x)) for s in steps.values() for x in s.losses)
    ok, desc = b.parity(steps, torch.float32, n_steps=3)
    assert ok and "over the first 6 steps" in desc, desc


def test_host_path_benchmark_counts_launches_and_writes_its_rows(tmp_path):
    """bench_host_path.py in a fresh process (it stubs Triton's launches before the kernels import):
    one row per provider, the fused path launching kernels, the torch path and F.linear none."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_host_path.py"), "--iters", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "GOAL host fused fwd+bwd" in proc.stdout
    with (tmp_path / "cpu_host_path.csv").open(newline="") as f:
        rows = {row["provider"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"fused", "fused_fold", "torch", "linear", "function_floor"}
    assert int(rows["fused"]["launches"]) == int(rows["fused_fold"]["launches"]) == 6
    assert int(rows["fused_fold"]["aten_ops"]) < int(rows["fused"]["aten_ops"])  # no d(lambda) ops
    assert all(int(rows[p]["launches"]) == 0 for p in ("torch", "linear", "function_floor"))
    assert all(float(row["host_us"]) > 0 and int(row["aten_ops"]) > 0 for row in rows.values())
