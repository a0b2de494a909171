"""Data-parallel training: DistributedDataParallel over 2 gloo processes on the CPU equals one process
training on the whole batch (same ranks kept, same adapter weights), and both ranks agree bit for bit.
FSDP2 (``fully_shard``) is refused with a clear error.

The tests launch this file as a script, once per rank (``python tests/integration/test_ddp.py SCENARIO
RANK ...``, the repository root on ``PYTHONPATH`` so that the script imports ``tests.helpers``), with a
``FileStore`` rendezvous in ``tmp_path`` (no port to pick, so no port race), a 60 s timeout on every
collective and a wall-clock limit on the whole launch, so a stuck rank fails the test instead of
hanging it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, tiny_llama

WORLD = 2
GLOBAL_BATCH = 4  # rows per step; each rank takes GLOBAL_BATCH // WORLD of them
SEQ = 9  # no padding: every row has SEQ - 1 predicted tokens, so each rank's mean has equal weight
LR = 1e-2
# M = 14 adapted matrices (2 Llama layers x 7): budget 84 -> 28. Warm-up steps 0-2, budget phase 3-8
# with mask steps 4, 6, 8 (budgets 48, 32, 28), the forced final mask at step 9 = T - tfinal, then the
# recorded pattern re-applied at steps 10 and 11.
SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
KINDS = ("lora_A", "lora_E", "lora_B")
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
LAUNCH_TIMEOUT_S = 240
REPO_ROOT = Path(__file__).resolve().parents[2]  # on the ranks' PYTHONPATH: they import tests.helpers

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


def _rank_fsdp(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    # orth_reg_weight=0 so that the forward + backward run: the regulariser refuses sharded adapters
    # (checked below, called directly), as the allocator does.
    model = _model(orth_reg_weight=0.0)
    for layer in model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    record: dict[str, object] = {"param_type": type(model.adapted_layers[0][1].lora_E).__name__}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][rank * 2 : rank * 2 + 2]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    local_E = [m.lora_E.to_local().clone() for _, m in model.adapted_layers]
    calls = {
        "af.update_and_allocate": lambda: af.update_and_allocate(model, 0),
        "model.update_and_allocate": lambda: model.update_and_allocate(0),
        "model.build_allocator": model.build_allocator,
        "model.orth_regularization": model.orth_regularization,
    }
    for name, call in calls.items():
        try:
            call()
            record[name] = None
        except Exception as e:  # recorded for the test to judge
            record[name] = [type(e).__name__, str(e), isinstance(e, RuntimeError)]
    # The refused calls left the shards alone (no re-binding of lora_E, no masking).
    record["E_untouched"] = all(
        torch.equal(m.lora_E.to_local(), e) for (_, m), e in zip(model.adapted_layers, local_E, strict=True)
    )
    # Only the second decoder layer sharded: the per-call check of the first adapter passes, the
    # binding of the flat E buffer (first thing a scoring step does) refuses.
    partial = _model(orth_reg_weight=0.0)
    fully_shard(partial.model.model.layers[1])
    partial(input_ids=x, labels=x).loss.backward()
    try:
        af.update_and_allocate(partial, 0)
        record["partial"] = None
    except Exception as e:  # recorded for the test to judge
        record["partial"] = [type(e).__name__, str(e), isinstance(e, RuntimeError)]
    (out / f"fsdp_rank{rank}.json").write_text(json.dumps(record))


def _rank_main(scenario: str, rank: int, store: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        {"ddp": _rank_ddp, "fsdp": _rank_fsdp}[scenario](rank, out)
    finally:
        dist.destroy_process_group()


# ---- the launcher -------------------------------------------------------------------------------------


def _launch(scenario: str, tmp_path: Path) -> None:
    """Run ``scenario`` on WORLD ranks (one process each); fail with their output if any rank fails or
    the launch outlives LAUNCH_TIMEOUT_S."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    store = tmp_path / f"{scenario}.store"
    logs = [tmp_path / f"{scenario}_rank{r}.log" for r in range(WORLD)]
    procs = []
    for r in range(WORLD):
        with open(logs[r], "w") as log:
            cmd = [sys.executable, __file__, scenario, str(r), str(store), str(tmp_path)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * WORLD:
        output = "\n".join(
            f"--- rank {r} (exit {c}) ---\n{logs[r].read_text()[-4000:]}" for r, c in enumerate(codes)
        )
        pytest.fail(
            f"{scenario}: ranks exited with {codes} (negative: killed after {LAUNCH_TIMEOUT_S} s)\n{output}"
        )


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


def test_fsdp2_sharded_adapters_are_refused_with_a_clear_error(tmp_path):
    _launch("fsdp", tmp_path)
    for r in range(WORLD):
        record = json.loads((tmp_path / f"fsdp_rank{r}.json").read_text())
        assert record["param_type"] == "DTensor"
        calls = ("af.update_and_allocate", "model.update_and_allocate", "model.build_allocator",
                 "model.orth_regularization")  # fmt: skip
        for call in calls:
            assert record[call] is not None, f"{call} accepted FSDP2-sharded adapters"
            kind, message, is_runtime_error = record[call]
            assert kind == "NotImplementedError" and is_runtime_error, (call, kind, message)
            for word in ("FSDP", "fully_shard", "DistributedDataParallel"):
                assert word in message, (call, word, message)
        assert record["E_untouched"]
        assert record["partial"] is not None, "update_and_allocate accepted a partly FSDP2-sharded model"
        kind, message, _ = record["partial"]
        assert kind == "NotImplementedError" and message.startswith("model.layers.1."), (kind, message)
        assert "fully_shard" in message and "DistributedDataParallel" in message, message


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
