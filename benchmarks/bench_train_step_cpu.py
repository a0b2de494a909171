"""CPU benchmark of a full AdaLoRA training step: adalora_fast vs PEFT on identical models.

A Llama-style model (8 layers, hidden 256, MLP 512, vocab 512; batch 2 x 64, fp32), all 7
projections adapted at init_r 12 (``bench_train_e2e.adalora_kwargs``: every step a mask step of the
budget phase). One step (``bench_train_e2e.OptimizerStep``) = forward with labels (loss + orthogonal
regulariser), backward, AdamW, ``update_and_allocate(step)``, ``zero_grad``; the step counter
advances on every call. Also timed, as floors: ``frozen`` forward under no_grad (mode ``fwd``) and
``frozen`` forward + backward through the activations only (mode ``fwd+bwd``, the baseline). The
check, before timing: ours and PEFT agree on their first losses (``bench_train_e2e.parity``).

``update_and_allocate`` alone is benchmarked by ``bench_allocator.py`` (the ``update_and_allocate``
rows already in ``cpu_train_step.csv`` came from an earlier version of this file). Rows go to
``<out>/cpu_train_step.csv`` (op ``train_step``, d_in = d_out = hidden, tokens = batch x seq).

    python benchmarks/bench_train_step_cpu.py [--out DIR] [--quick] [--iters N] [--no-csv]
    pytest benchmarks/bench_train_step_cpu.py --benchmark-only
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import harness
import pytest
import torch
from bench_train_e2e import INIT_R, OURS, FrozenStep, OptimizerStep, adapt, parity
from harness import Case

PROVIDERS = ("frozen", "adalora_fast", "peft")
BATCH, SEQ = 2, 64
TRAIN_SHAPE = {"layers": 8, "hidden": 256, "intermediate": 512, "vocab": 512}
SEED = 0


class FrozenForward:
    """The frozen base model's forward (with labels, so the loss is included) under no_grad."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids = model.eval().requires_grad_(False), ids

    def __call__(self) -> None:
        with torch.no_grad():
            self.model(input_ids=self.ids, labels=self.ids)


def setup(_config: Any = None) -> Case:
    """The four providers on copies of one base model (fresh adapters from the same seed)."""
    base = harness.tiny_llama(**TRAIN_SHAPE, seed=SEED)
    ids = torch.randint(0, TRAIN_SHAPE["vocab"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1234))

    def build(key: str) -> Any:
        if key.startswith("frozen"):
            return (FrozenForward if key == "frozen fwd" else FrozenStep)(copy.deepcopy(base), ids)
        model, update = adapt(copy.deepcopy(base), OURS if key == OURS else "peft_adalora")
        return OptimizerStep(model, ids, update)

    row = {
        "op": "train_step",
        "mode": "fwd+bwd+step",
        "d_in": TRAIN_SHAPE["hidden"],
        "d_out": TRAIN_SHAPE["hidden"],
        "tokens": BATCH * SEQ,
        "r": INIT_R,
        "dtype": "float32",
    }
    fields = {f"frozen {m}": {"provider": "frozen", "mode": m, "r": None} for m in ("fwd", "fwd+bwd")}
    case = Case(
        {},
        row,
        baseline="frozen fwd+bwd",
        fields=fields,
        checked=(OURS,),
        reference="peft",
        title=f"train_step {TRAIN_SHAPE}, batch {BATCH} x seq {SEQ}, init_r {INIT_R}, fp32 (CPU)",
    )
    case.providers = harness.build_each(["frozen fwd", "frozen fwd+bwd", OURS, "peft"], build, case.failures)
    steps = case.providers
    case.check = lambda _: parity(
        {k: v for k, v in ((OURS, steps.get(OURS)), ("peft_adalora", steps.get("peft"))) if v is not None},
        torch.float32,
        n_steps=3,
    )
    case.columns = {
        "ours / provider": lambda k, t, same: f"{t / same[OURS]:.3f}" if OURS in same and k != OURS else "-"
    }
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, PROVIDERS, iters=(20, 5), cpu_warmup=(3, 1), gpu=False)
    args = harness.parse_args(parser, argv)
    return harness.run(
        args,
        [None],
        setup,
        title="CPU training-step benchmark",
        device="cpu",
        csv_names=("cpu_train_step.csv", "cpu_train_step.csv"),
        intro="update_and_allocate alone: python benchmarks/bench_allocator.py",
    )


@pytest.fixture(scope="module")
def cpu_case() -> Case:
    pytest.importorskip("peft")
    return setup()


@pytest.mark.parametrize("key", ["frozen fwd", "frozen fwd+bwd", OURS, "peft"])
def test_train_step(benchmark: Any, cpu_case: Case, key: str) -> None:
    harness.pytest_benchmark(benchmark, cpu_case, key, rounds=15, warmup=3)


if __name__ == "__main__":
    sys.exit(main())
