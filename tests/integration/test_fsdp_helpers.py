"""What the ``test_fsdp_*`` files share (no tests here): the tiny Llama they shard, the user's training
loop, the rows each rank takes, the comparisons of ranks against each other and against one process, and
the rank scripts' entry point.

Each ``test_fsdp_*`` file launches itself on 2 gloo processes on the CPU (``tests.helpers.launch_ranks``),
once per group of scenarios; each rank writes what it saw and the test judges it against a one-process
run. Checks that need one process only run in the test process, some with a 1-rank gloo group.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, init_gloo, tiny_llama

WORLD = 2
GLOBAL_BATCH = 4  # rows per step; each rank takes GLOBAL_BATCH // WORLD of them
SEQ = 9  # no padding: every row has SEQ - 1 predicted tokens, so each rank's mean has equal weight
LR = 1e-2
# 14 adapted matrices (2 Llama layers x 7), budget 84 -> 28: warm-up steps 0-2, mask steps 4, 6, 8, the
# final mask at step 9, the recorded pattern re-applied at steps 10 and 11.
SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
SHORT = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 6}
RESUME_AT = 5  # the checkpoint of the resume scenarios is written after this step
KINDS = ("lora_A", "lora_E", "lora_B")
LAUNCH_TIMEOUT_S = 240

NEEDS_GLOO = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)


def make_model(
    seed: int, schedule: dict = SCHEDULE, checkpointing: bool = False, **overrides
) -> af.AdaLoraModel:
    """The tiny Llama (the same base weights everywhere) with adapters drawn after ``manual_seed(seed)``;
    ``checkpointing``: re-entrant activation checkpointing of its decoder layers (in train mode)."""
    base = tiny_llama(2)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.train()
    torch.manual_seed(seed)
    config = af.AdaLoraConfig(target_modules=LLAMA_PROJ, lora_dropout=0.0, **{**schedule, **overrides})
    return af.get_adalora_model(base, config)


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = af.unwrap_model(model)
    return {n: p.detach().clone() for n, p in inner.named_parameters() if n.rsplit(".", 1)[-1] in KINDS}


def train(
    model: torch.nn.Module,
    rows: slice,
    steps: range,
    *,
    micro: int = 1,
    clip: float | None = None,
    opt: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> dict:
    """A user's loop over ``rows`` of every global batch: ``micro`` micro-batches per step (all but the
    last without gradient sync when sharded), optional clipping, AdamW, the allocator after
    ``optimizer.step()``. Returns the losses, budgets, rank patterns and final adapter weights."""
    schedule = af.unwrap_model(model).adalora_config
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=LR)
    sharded = hasattr(model, "set_requires_gradient_sync")
    data = batches(schedule.total_step, batch=GLOBAL_BATCH, seq=SEQ)
    losses, budgets, patterns = [], [], []
    for step in steps:
        x = data[step][rows]
        total = 0.0
        for i, part in enumerate(x.chunk(micro)):
            if sharded:
                model.set_requires_gradient_sync(i == micro - 1)
            loss = model(input_ids=part, labels=part).loss / micro
            loss.backward()
            total += float(loss.detach())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        budgets.append(af.update_and_allocate(model, step, opt))
        patterns.append(af.unwrap_model(model).rank_pattern)
        opt.zero_grad()
        losses.append(total)
        if on_step is not None:
            on_step(step, opt)
    return {"losses": losses, "budgets": budgets, "patterns": patterns, "weights": adapter_weights(model)}


def one_thread_train(*args, **kwargs) -> dict:
    """:func:`train` on one CPU thread, as each rank runs (``init_gloo``): the same matmul blocking."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def rows_of(rank: int | None) -> slice:
    """The rows of every global batch that ``rank`` takes (all of them for ``None``: one process)."""
    if rank is None:
        return slice(None)
    per_rank = GLOBAL_BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def first_step(wrapped: torch.nn.Module, rank: int) -> list | None:
    """One training step of ``wrapped`` on this rank's rows: None if it ran, else the error as
    ``[type, message, where]`` (``where``: "forward", "backward", "step" or "allocator")."""
    x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][rows_of(rank)]
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    where = "forward"
    try:
        loss = wrapped(input_ids=x, labels=x).loss
        where = "backward"
        loss.backward()
        where = "step"
        opt.step()
        where = "allocator"
        af.update_and_allocate(wrapped, 0)
    except Exception as e:  # recorded for the test to judge
        return [type(e).__name__, str(e), where]
    return None


# ---- judging the ranks ------------------------------------------------------------------------------


def assert_ranks_alike(ranks: list[dict], run: str) -> None:
    for other in ranks[1:]:
        a, b = ranks[0][run], other[run]
        assert b["budgets"] == a["budgets"] and b["patterns"] == a["patterns"], run
        for n, w in a["weights"].items():
            assert torch.equal(b["weights"][n], w), (run, n)


def assert_bitwise_one_process_on_the_ranks_rows(sharded: dict, single: dict, run: str) -> None:
    """``single``: one process (one thread, as each rank) taking each rank's rows as a micro-batch of its
    own (loss / WORLD): the same sums in the same order as the all-reduce, so the same weights bit for
    bit. (Against the whole batch in one micro-batch the weights differ by fp32 rounding only, then.)"""
    assert sharded["budgets"] == single["budgets"] and sharded["patterns"] == single["patterns"], run
    for n, w in single["weights"].items():
        assert torch.equal(sharded["weights"][n], w), (run, n)


def assert_equals_one_process(sharded: dict, single: dict, run: str) -> None:
    assert sharded["budgets"] == single["budgets"], run
    assert sharded["patterns"] == single["patterns"], run
    assert sharded["weights"].keys() == single["weights"].keys()
    for n, w in single["weights"].items():
        torch.testing.assert_close(
            sharded["weights"][n], w, rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{run} {n}: {s}"
        )


# ---- process groups -----------------------------------------------------------------------------------


@contextlib.contextmanager
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A 1-rank gloo process group in the test process (FSDP2 runs as on many ranks, the all-reduces
    are identities), destroyed afterwards so that no other test sees it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'one_rank.store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_rank(scenarios: Mapping[str, Callable[[int, Path], None]], argv: list[str] | None = None) -> None:
    """A rank script's entry point: ``FILE SCENARIO RANK STORE OUT`` (see ``tests.helpers.launch_ranks``)."""
    scenario, rank, store, out = (argv or sys.argv)[1:5]
    init_gloo(int(rank), WORLD, store)
    try:
        scenarios[scenario](int(rank), Path(out))
    finally:
        dist.destroy_process_group()
