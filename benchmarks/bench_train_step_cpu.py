"""CPU benchmark of a full AdaLoRA training step: adalora_fast vs PEFT on identical models.

One step = forward with labels (loss + orthogonal regulariser), backward, AdamW step,
``update_and_allocate(step)``, ``zero_grad``. The schedule (tinit = tfinal = 0, total_step = 10**6)
keeps every timed step a mask step of the budget phase; the step counter advances on every call.

Also timed, ``frozen``: the base model alone, as floors: forward under no_grad (mode ``fwd``) and
forward + backward through the activations only (mode ``fwd+bwd``: ``inputs_embeds`` requires grad,
every weight is frozen), which is what any adapter's training step has to pay at least.

``update_and_allocate`` alone (32 layers x 7 projections at d = 512, the "torch backend >= 3x faster
than PEFT" goal) is benchmarked by ``benchmarks/bench_allocator.py`` (rows in ``cpu_allocator.csv``);
the ``update_and_allocate`` rows already in ``cpu_train_step.csv`` came from an earlier version of this
file (a real Llama model, MLP 512 -> 1024, gradients of one training step).

Run as ``pytest benchmarks/bench_train_step_cpu.py --benchmark-only`` or as a script,
``python benchmarks/bench_train_step_cpu.py``, which prints a markdown table (with ours/peft ratios)
and appends rows to ``benchmarks/results/cpu_train_step.csv``. Thread count is torch's default; it
is printed with the results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from harness import LLAMA_PROJ, append_rows, describe_environment, time_cpu_interleaved, tiny_llama

PROVIDERS = ("adalora_fast", "peft")
INIT_R, TARGET_R = 12, 8
TOTAL_STEP = 10**6
BATCH, SEQ = 2, 64
# The training-step model: Llama-style, 8 layers, hidden 256, intermediate 512, vocab 512.
TRAIN_SHAPE = {"layers": 8, "hidden": 256, "intermediate": 512, "vocab": 512}
CSV_NAME = "cpu_train_step.csv"
SEED = 0
LOSS_LOG = 16  # losses kept per run for the parity smoke check


def adalora_kwargs() -> dict[str, Any]:
    """The AdaLoRA hyper-parameters shared by both providers."""
    return {
        "init_r": INIT_R,
        "target_r": TARGET_R,
        "tinit": 0,
        "tfinal": 0,
        "deltaT": 1,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "total_step": TOTAL_STEP,
        "target_modules": list(LLAMA_PROJ),
    }


def wrap(model: torch.nn.Module, provider: str, seed: int) -> tuple[torch.nn.Module, Callable[[int], Any]]:
    """``(wrapped model, update_and_allocate)`` for ``provider``; adapters drawn from ``seed``."""
    torch.manual_seed(seed)
    if provider == "adalora_fast":
        import adalora_fast as af

        wrapped = af.get_adalora_model(model, af.AdaLoraConfig(**adalora_kwargs()))
        return wrapped, wrapped.update_and_allocate
    if provider == "peft":
        import peft

        wrapped = peft.get_peft_model(model, peft.AdaLoraConfig(task_type="CAUSAL_LM", **adalora_kwargs()))
        return wrapped, wrapped.base_model.update_and_allocate
    raise ValueError(f"unknown provider {provider!r}")


def input_ids(vocab: int, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def count_adapted(model: torch.nn.Module) -> int:
    return sum(1 for n, _ in model.named_parameters() if n.endswith("lora_E") or ".lora_E." in n)


class TrainStep:
    """One full training step per call; the global step advances on every call."""

    def __init__(self, provider: str, shape: dict[str, int], seed: int = SEED) -> None:
        self.provider = provider
        base = tiny_llama(**shape, seed=seed)
        self.model, self.update_and_allocate = wrap(base, provider, seed + 1)
        self.model.train()
        self.n_adapted = count_adapted(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-3)
        self.ids = input_ids(shape["vocab"])
        self.step = 1  # tinit = 0: step 0 never masks, every later step of the budget phase does
        self.losses: list[torch.Tensor] = []

    def __call__(self) -> None:
        out = self.model(input_ids=self.ids, labels=self.ids)
        out.loss.backward()
        self.opt.step()
        self.update_and_allocate(self.step)
        self.opt.zero_grad(set_to_none=True)
        if len(self.losses) < LOSS_LOG:
            self.losses.append(out.loss.detach())
        self.step += 1


class FrozenForward:
    """The frozen base model's forward (with labels, so the loss is included) under no_grad."""

    def __init__(self, shape: dict[str, int], seed: int = SEED) -> None:
        self.model = tiny_llama(**shape, seed=seed).eval().requires_grad_(False)
        self.ids = input_ids(shape["vocab"])

    def __call__(self) -> None:
        with torch.no_grad():
            self.model(input_ids=self.ids, labels=self.ids)


class FrozenForwardBackward:
    """The frozen base model's forward + backward through the activations only (no weight grads)."""

    def __init__(self, shape: dict[str, int], seed: int = SEED) -> None:
        self.model = tiny_llama(**shape, seed=seed).train().requires_grad_(False)
        self.ids = input_ids(shape["vocab"])
        with torch.no_grad():
            self.embeds = self.model.get_input_embeddings()(self.ids)

    def __call__(self) -> None:
        embeds = self.embeds.detach().requires_grad_(True)
        out = self.model(inputs_embeds=embeds, labels=self.ids)
        out.loss.backward()


def shape_label(shape: dict[str, int]) -> str:
    return f"{shape['layers']}L h{shape['hidden']} i{shape['intermediate']} v{shape['vocab']}"


# ---- pytest-benchmark ---------------------------------------------------------------------------
TRAIN_GROUP = f"train_step {shape_label(TRAIN_SHAPE)} b{BATCH}x{SEQ} fp32 (CPU)"


def _pedantic(benchmark: Any, fn: Callable[[], None], rounds: int, warmup: int) -> None:
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark: Any, provider: str) -> None:
    pytest.importorskip(provider)
    benchmark.group = TRAIN_GROUP
    fn = TrainStep(provider, TRAIN_SHAPE)
    assert fn.n_adapted == 7 * TRAIN_SHAPE["layers"]
    benchmark.extra_info.update(provider=provider, mode="fwd+bwd+step")
    _pedantic(benchmark, fn, rounds=15, warmup=3)
    assert all(torch.isfinite(x) for x in fn.losses)


def test_train_step_frozen_fwd(benchmark: Any) -> None:
    benchmark.group = TRAIN_GROUP
    benchmark.extra_info.update(provider="frozen", mode="fwd")
    _pedantic(benchmark, FrozenForward(TRAIN_SHAPE), rounds=15, warmup=3)


def test_train_step_frozen_fwd_bwd(benchmark: Any) -> None:
    benchmark.group = TRAIN_GROUP
    benchmark.extra_info.update(provider="frozen", mode="fwd+bwd")
    _pedantic(benchmark, FrozenForwardBackward(TRAIN_SHAPE), rounds=15, warmup=3)


# ---- script mode --------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
    parser.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args(argv)

    print(f"# CPU training-step benchmark\n\n{describe_environment()}\n", flush=True)
    tokens = BATCH * SEQ
    results: list[dict[str, Any]] = []  # rows for the CSV, plus table-only keys

    def record(op: str, mode: str, provider: str, shape: dict[str, int], ts: list[float], **extra: Any):
        ms = statistics.median(ts)
        results.append(
            {
                "op": op,
                "mode": mode,
                "provider": provider,
                "d_in": shape["hidden"],
                "d_out": shape["hidden"],
                "dtype": "float32",
                "median_ms": ms,
                "shape": shape_label(shape),
                "min_ms": min(ts),
                **extra,
            }
        )
        print(f"  {op:20s} {mode:12s} {provider:13s} median {ms:9.2f} ms  min {min(ts):9.2f} ms", flush=True)

    # Every group is timed round-robin (time_cpu_interleaved) so that load from other processes on
    # the machine hits all providers alike.
    steps = {p: TrainStep(p, TRAIN_SHAPE) for p in PROVIDERS}
    train_fns: dict[str, Callable[[], None]] = {
        "frozen/fwd": FrozenForward(TRAIN_SHAPE),
        "frozen/fwd+bwd": FrozenForwardBackward(TRAIN_SHAPE),
        **{f"{p}/fwd+bwd+step": steps[p] for p in PROVIDERS},
    }
    times = time_cpu_interleaved(train_fns, warmup=args.warmup, iters=args.iters)
    for key, ts in times.items():
        provider, mode = key.split("/")
        extra = {"r": INIT_R} if provider != "frozen" else {}
        record("train_step", mode, provider, TRAIN_SHAPE, ts, tokens=tokens, **extra)

    # Parity smoke check: identical models, data and schedule, so the losses should agree.
    ours, peer = steps["adalora_fast"].losses, steps["peft"].losses
    n = min(len(ours), len(peer))
    diffs = [abs(float(a) - float(b)) for a, b in zip(ours[:n], peer[:n], strict=True)]
    print(
        f"\nloss parity over the first {n} steps: max |ours - peft| = {max(diffs):.3e} "
        f"(step-1 loss {float(ours[0]):.6f} vs {float(peer[0]):.6f})"
    )

    # Markdown table.
    by_key = {(r["op"], r["mode"], r["provider"]): r["median_ms"] for r in results}
    floor = by_key.get(("train_step", "fwd+bwd", "frozen"))
    print(
        f"\nCPU numbers ({describe_environment()}); train step: batch {BATCH} x seq {SEQ}, "
        f"{7 * TRAIN_SHAPE['layers']} adapted matrices, init_r {INIT_R}, fp32.\n"
    )
    print("| op | mode | provider | model | median ms | min ms | ours/peft | x frozen fwd+bwd |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in results:
        peft_ms = by_key.get((r["op"], r["mode"], "peft"))
        ratio = _ratio(r["median_ms"], peft_ms) if r["provider"] == "adalora_fast" else ""
        vs_floor = _ratio(r["median_ms"], floor) if r["op"] == "train_step" else ""
        print(
            f"| {r['op']} | {r['mode']} | {r['provider']} | {r['shape']} | {r['median_ms']:.2f} "
            f"| {r['min_ms']:.2f} | {ratio} | {vs_floor} |"
        )
    print("\nupdate_and_allocate alone: python benchmarks/bench_allocator.py")
    if not args.no_csv:
        rows = [{k: v for k, v in r.items() if k not in ("shape", "min_ms")} for r in results]
        path = append_rows(CSV_NAME, rows)
        print(f"\nappended {len(results)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
