"""Data-parallel training: DistributedDataParallel over 2 gloo processes on the CPU equals one process
training on the whole batch (same ranks kept, same adapter weights), and both ranks agree bit for bit.
(FSDP2 and the engines that are refused: ``test_fsdp_*.py``.)

The tests launch this file as a script, once per rank (``tests.helpers.launch_ranks``: a FileStore
rendezvous, a timeout on every collective and on the whole launch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, init_gloo, launch_ranks, peft_adalora, tiny_llama

WORLD = 2
GLOBAL_BATCH = 4  # rows per step; each rank takes GLOBAL_BATCH // WORLD of them
SEQ = 9  # no padding: every row has SEQ - 1 predicted tokens, so each rank's mean has equal weight
LR = 1e-2
# M = 14 adapted matrices (2 Llama layers x 7): budget 84 -> 28. Warm-up steps 0-2, budget phase 3-8
# with mask steps 4, 6, 8 (budgets 48, 32, 28), the forced final mask at step 9 = T - tfinal, then the
# recorded pattern re-applied at steps 10 and 11.
SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
KINDS = ("lora_A", "lora_E", "lora_B")
LAUNCH_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)


def _model(**overrides) -> af.AdaLoraModel:
    config = af.AdaLoraConfig(target_modules=LLAMA_PROJ, lora_dropout=0.0, **{**SCHEDULE, **overrides})
    return af.get_adalora_model(tiny_llama(2), config)


def _adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = af.unwrap_model(model)
    return {n: p.detach().clone() for n, p in inner.named_parameters() if n.rsplit(".", 1)[-1] in KINDS}


def _train(wrapped: torch.nn.Module, rows: slice) -> dict:
    """The training loop of a user: ``rows`` of every global batch, AdamW, the allocator through the
    wrapper after ``optimizer.step()``. Returns the budgets, the rank pattern after every step and the
    final adapter weights."""
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    budgets, patterns = [], []
    for step, x in enumerate(batches(SCHEDULE["total_step"], batch=GLOBAL_BATCH, seq=SEQ)):
        x = x[rows]
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        budgets.append(af.update_and_allocate(wrapped, step))
        patterns.append(af.unwrap_model(wrapped).rank_pattern)
        opt.zero_grad()
    return {"budgets": budgets, "patterns": patterns, "weights": _adapter_weights(wrapped)}


# ---- the ranks (run as a script) ----------------------------------------------------------------------


def _rank_ddp(rank: int, out: Path) -> None:
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per_rank = GLOBAL_BATCH // WORLD
    result = _train(ddp, slice(rank * per_rank, (rank + 1) * per_rank))
    torch.save(result, out / f"ddp_rank{rank}.pt")


def _rank_join(rank: int, out: Path) -> None:
    """Uneven inputs (8 batches on rank 0, 5 on rank 1) under DDP's Join: refused at the first forward;
    with throw_on_early_termination=True every rank stops at the same step, alike; training after a
    Join block has ended is not refused."""
    from torch.distributed.algorithms.join import Join

    record: dict[str, object] = {}
    data = batches(8 if rank == 0 else 5, batch=2, seq=SEQ)
    for throw in (False, True):
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=LR)
        steps = 0
        try:
            # Join stores the joinables as given: a tuple as well as a list
            with Join((ddp,) if not throw else [ddp], throw_on_early_termination=throw):
                for step, x in enumerate(data):
                    ddp(input_ids=x, labels=x).loss.backward()
                    opt.step()
                    af.update_and_allocate(ddp, step)
                    opt.zero_grad()
                    steps += 1
            record[str(throw)] = [None, steps]
        except RuntimeError as e:
            record[str(throw)] = [str(e), steps]
        record[f"{throw} last_step"] = model.rank_allocator.last_step
        record[f"{throw} weights"] = {n: w.tolist() for n, w in _adapter_weights(model).items()}
        if not throw:
            # The refused block has ended, but Join never resets ddp._join_config: training the same
            # DDP module on even inputs after the block is not refused.
            assert ddp._join_config.enable
            for step, x in enumerate(batches(3, batch=2, seq=SEQ)):
                ddp(input_ids=x, labels=x).loss.backward()
                opt.step()
                af.update_and_allocate(ddp, step)
                opt.zero_grad()
            record["after block weights"] = {n: w.tolist() for n, w in _adapter_weights(model).items()}
    (out / f"join_rank{rank}.json").write_text(json.dumps(record))


def _rank_peft_checkpointing(rank: int, out: Path) -> None:
    """A PEFT model accelerated in place, with gradient checkpointing, under DDP: the engine check at the
    first adapted layer must not fire again when checkpointing reruns that layer inside backward."""
    pm = peft_adalora(tiny_llama(2).train(), LLAMA_PROJ, total_step=SCHEDULE["total_step"])
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    af.accelerate_peft(pm)
    ddp = torch.nn.parallel.DistributedDataParallel(pm)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=LR)
    per_rank = GLOBAL_BATCH // WORLD
    for step, x in enumerate(batches(3, batch=GLOBAL_BATCH, seq=SEQ)):
        x = x[rank * per_rank : (rank + 1) * per_rank]
        ddp(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    assert pm.base_model.model.model.gradient_checkpointing and pm.training
    record: dict[str, object] = {n: p.detach().tolist() for n, p in pm.named_parameters() if p.requires_grad}
    # With a task type (PeftModelForCausalLM calls the tuner, which calls model.forward past its hooks)
    # the check still runs: refused without DDP, trained under it.
    for wrap in (False, True):
        causal = peft_adalora(tiny_llama(2), LLAMA_PROJ, total_step=4, task_type="CAUSAL_LM")
        af.accelerate_peft(causal)
        model = torch.nn.parallel.DistributedDataParallel(causal) if wrap else causal
        x = batches(1, batch=2, seq=SEQ)[0]
        try:
            model(input_ids=x, labels=x).loss.backward()
            record[f"causal wrap={wrap}"] = "trained"
        except RuntimeError as e:
            record[f"causal wrap={wrap}"] = str(e)
    (out / f"peft_ckpt_rank{rank}.json").write_text(json.dumps(record))


def _rank_main(scenario: str, rank: int, store: str, out: Path) -> None:
    init_gloo(rank, WORLD, store)
    try:
        {"ddp": _rank_ddp, "join": _rank_join, "peft_ckpt": _rank_peft_checkpointing}[scenario](rank, out)
    finally:
        dist.destroy_process_group()


def _launch(scenario: str, tmp_path: Path) -> None:
    launch_ranks(__file__, scenario, tmp_path, WORLD, LAUNCH_TIMEOUT_S)


# ---- tests --------------------------------------------------------------------------------------------


def test_ddp_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    _launch("ddp", tmp_path)
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt") for r in range(WORLD)]
    single = _train(_model(), slice(None))

    # The schedule ran through budget-phase masks (budget strictly between init and target) and the
    # final phase, and training moved the adapters.
    m = len(single["patterns"][0])
    init_bgt, target_bgt = SCHEDULE["init_r"] * m, SCHEDULE["target_r"] * m
    assert single["budgets"][:3] == [init_bgt] * 3
    assert any(target_bgt < b < init_bgt for b in single["budgets"][3:9])
    assert single["budgets"][9:] == [target_bgt] * 3
    kept = [sum(map(sum, p.values())) for p in single["patterns"]]
    assert kept[4] < init_bgt and kept[-1] == target_bgt
    initial = _adapter_weights(_model())
    assert all(not torch.equal(single["weights"][n], initial[n]) for n in initial if "lora_E" not in n)
    assert sum(int(w.count_nonzero()) for n, w in single["weights"].items() if "lora_E" in n) == target_bgt

    # Both ranks: the same budgets and patterns at every step, and the same weights, bit for bit.
    for other in ranks[1:]:
        assert other["budgets"] == ranks[0]["budgets"]
        assert other["patterns"] == ranks[0]["patterns"]
        assert other["weights"].keys() == ranks[0]["weights"].keys()
        for n, w in ranks[0]["weights"].items():
            assert torch.equal(other["weights"][n], w), n

    # DDP (mean of the two ranks' token means) equals one process on the whole batch.
    assert ranks[0]["budgets"] == single["budgets"]
    assert ranks[0]["patterns"] == single["patterns"]
    assert ranks[0]["weights"].keys() == single["weights"].keys()
    for n, w in single["weights"].items():
        torch.testing.assert_close(
            ranks[0]["weights"][n], w, rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}"
        )


def test_uneven_inputs_under_join_are_refused_or_stop_every_rank_alike(tmp_path):
    _launch("join", tmp_path)
    ranks = [json.loads((tmp_path / f"join_rank{r}.json").read_text()) for r in range(WORLD)]
    for record in ranks:
        message, steps = record["False"]
        assert steps == 0 and message.startswith("adalora_fast cannot train under DDP's Join context"), (
            message
        )
        assert "throw_on_early_termination=True" in message
        assert record["False last_step"] is None
        message, steps = record["True"]
        assert steps == 5 and "exhausted" in message, (steps, message)  # DDP's own error, on every rank
    assert ranks[0]["True last_step"] == ranks[1]["True last_step"] == 4
    assert ranks[0]["True weights"] == ranks[1]["True weights"]
    assert ranks[0]["after block weights"] == ranks[1]["after block weights"]


def test_peft_model_accelerated_in_place_is_checked_once_per_forward_under_ddp(tmp_path):
    _launch("peft_ckpt", tmp_path)
    ranks = [json.loads((tmp_path / f"peft_ckpt_rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] and ranks[0] == ranks[1]
    assert ranks[0]["causal wrap=False"].startswith("adalora_fast cannot train under an engine other than")
    assert ranks[0]["causal wrap=True"] == "trained"


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
