"""``adalora_fast.fully_shard`` on 2 gloo processes on the CPU: the frozen base sharded (DTensors, half the
rows per rank), the adapters replicated; with the ranks seeded differently, both ranks end bit for bit
alike and equal one process training on the whole batch (same budgets and rank pattern at every step,
adapter weights within fp32 rounding), also with gradient accumulation without sync, gradient clipping,
compaction under activation checkpointing, the Triton scorer, bf16 mixed precision, resume and
checkpoints. One launch for all of them (``sharded_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import adalora_fast as af
from tests.helpers import launch_ranks, tiny_llama
from tests.integration.test_fsdp_helpers import (
    KINDS,
    LAUNCH_TIMEOUT_S,
    LR,
    NEEDS_GLOO,
    RESUME_AT,
    SCHEDULE,
    SHORT,
    WORLD,
    adapter_weights,
    assert_bitwise_one_process_on_the_ranks_rows,
    assert_equals_one_process,
    assert_ranks_alike,
    make_model,
    one_thread_train,
    rows_of,
    run_rank,
    train,
)

pytestmark = NEEDS_GLOO
COMPACTING = {"checkpointing": True, "compact_after_final": True, "orth_reg_weight": 0.0}


# ---- the ranks (run as a script) ----------------------------------------------------------------------


def _rank_shard(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    results: dict[str, object] = {}
    # 1. The whole schedule, seeded differently per rank; a checkpoint for the resume run on the way.
    model = af.fully_shard(make_model(seed=rank))
    q = model.model.model.layers[0].self_attn.q_proj
    results["layout"] = {
        "base": type(q.base_layer.weight).__name__,
        "base_local_rows": q.base_layer.weight.to_local().shape[0],
        "base_rows": q.base_layer.weight.shape[0],
        "embed": type(model.model.model.embed_tokens.weight).__name__,
        "adapters": sorted({type(getattr(q, k)).__name__ for k in (*KINDS, "ranknum")}),
        "is_adalora": isinstance(model, af.AdaLoraModel),
    }
    try:
        af.fully_shard(model)
        results["twice"] = None
    except RuntimeError as e:
        results["twice"] = str(e)
    ckpt = out / "resume_ckpt"

    def save_midway(step: int, opt: torch.optim.Optimizer) -> None:
        if step == RESUME_AT:
            model.save_pretrained(ckpt, is_main_process=rank == 0)
            if rank == 0:
                torch.save(opt.state_dict(), ckpt / "optimizer.pt")
            dist.barrier()

    results["plain"] = train(model, rows_of(rank), range(SCHEDULE["total_step"]), on_step=save_midway)
    results["plain"]["reductions"] = model._adalora_replicated.reductions
    sd = model.state_dict()
    results["state_dict"] = {
        "keys": len(sd),
        "dtensors": sum(isinstance(t, DTensor) for t in sd.values()),
        "adapter_dtensors": sum(
            isinstance(t, DTensor) for k, t in sd.items() if k.rsplit(".", 1)[-1] in KINDS
        ),
    }
    model.save_pretrained(out / "final", is_main_process=rank == 0)
    dist.barrier()

    # 2. Resume: from_pretrained, then shard, then the optimizer's state; steps after RESUME_AT.
    resumed = af.AdaLoraModel.from_pretrained(tiny_llama(2), ckpt, is_trainable=True)
    af.fully_shard(resumed)
    opt = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=LR)
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    results["resumed"] = train(resumed, rows_of(rank), range(RESUME_AT + 1, SCHEDULE["total_step"]), opt=opt)

    # 3. Two micro-batches per step, the first without gradient sync, and gradient clipping.
    accum = af.fully_shard(make_model(seed=10 + rank))
    results["accum"] = train(accum, rows_of(rank), range(SCHEDULE["total_step"]), micro=2, clip=0.5)
    results["accum"]["reductions"] = accum._adalora_replicated.reductions

    # 4. Compaction at the final pattern, under re-entrant activation checkpointing (no regulariser,
    # whose gradient would reach the adapters in the outer autograd graph first).
    compacting = af.fully_shard(make_model(seed=40 + rank, **COMPACTING))
    results["compact"] = train(compacting, rows_of(rank), range(SCHEDULE["total_step"]))
    results["compact"]["reductions"] = compacting._adalora_replicated.reductions
    results["compact"]["shapes"] = {n: tuple(w.shape) for n, w in results["compact"]["weights"].items()}

    # 5. The Triton scorer and regulariser (the interpreter) on the sharded model, a short schedule.
    triton = af.fully_shard(make_model(seed=20 + rank, schedule=SHORT, backend="triton"))
    results["triton"] = train(triton, rows_of(rank), range(SHORT["total_step"]))

    # 6. FSDP2's bf16 mixed precision (bf16 compute of the base, fp32 gradient reduction), torch path.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = af.fully_shard(make_model(seed=30 + rank, schedule=SHORT, backend="torch"), mp_policy=policy)
    results["mixed"] = train(mixed, rows_of(rank), range(SHORT["total_step"]))
    results["mixed"]["dtypes"] = sorted({str(p.dtype) for p in mixed.parameters()})
    torch.save(results, out / f"shard_rank{rank}.pt")


# ---- tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("fsdp2")
    launch_ranks(__file__, "shard", out, WORLD, LAUNCH_TIMEOUT_S)
    return [torch.load(out / f"shard_rank{r}.pt") for r in range(WORLD)], out


def test_the_base_is_sharded_and_the_adapters_replicated(sharded_run):
    ranks, _ = sharded_run
    for r in ranks:
        layout = r["layout"]
        assert layout["base"] == "DTensor" and layout["embed"] == "DTensor"
        assert layout["base_local_rows"] * WORLD == layout["base_rows"]
        assert layout["adapters"] == ["Parameter"] and layout["is_adalora"]
        assert r["twice"].startswith("adalora_fast.fully_shard: the model is already sharded"), r["twice"]
        sd = r["state_dict"]
        assert sd["dtensors"] > 0 and sd["adapter_dtensors"] == 0


def test_fully_shard_equals_one_process_on_the_whole_batch(sharded_run):
    ranks, _ = sharded_run
    assert_ranks_alike(ranks, "plain")
    single = train(make_model(seed=0), rows_of(None), range(SCHEDULE["total_step"]))
    m = len(single["patterns"][0])
    # The schedule went through budget-phase masks and the final phase, and training moved the adapters.
    assert any(SCHEDULE["target_r"] * m < b < SCHEDULE["init_r"] * m for b in single["budgets"])
    assert single["budgets"][-1] == SCHEDULE["target_r"] * m
    initial = adapter_weights(make_model(seed=0))
    assert all(not torch.equal(single["weights"][n], initial[n]) for n in initial if "lora_E" not in n)
    assert_equals_one_process(ranks[0]["plain"], single, "plain")
    split = one_thread_train(make_model(seed=0), rows_of(None), range(SCHEDULE["total_step"]), micro=WORLD)
    assert_bitwise_one_process_on_the_ranks_rows(ranks[0]["plain"], split, "plain")
    assert ranks[0]["plain"]["reductions"] == SCHEDULE["total_step"]  # one bucket per backward


def test_gradient_accumulation_without_sync_and_clipping(sharded_run):
    ranks, _ = sharded_run
    assert_ranks_alike(ranks, "accum")
    # Rank r's two micro-batches are global rows 2r and 2r+1; one process takes all four rows at once.
    single = train(make_model(seed=10), rows_of(None), range(SCHEDULE["total_step"]), clip=0.5)
    assert_equals_one_process(ranks[0]["accum"], single, "accum")
    assert ranks[0]["accum"]["reductions"] == SCHEDULE["total_step"]  # none for the unsynced micro-batch


def test_compaction_under_reentrant_checkpointing(sharded_run):
    ranks, _ = sharded_run
    assert_ranks_alike(ranks, "compact")
    steps = range(SCHEDULE["total_step"])
    whole = train(make_model(seed=40, **COMPACTING), rows_of(None), steps)
    assert ranks[0]["compact"]["budgets"] == whole["budgets"]
    assert ranks[0]["compact"]["patterns"] == whole["patterns"]
    split = one_thread_train(make_model(seed=40, **COMPACTING), rows_of(None), steps, micro=WORLD)
    assert_bitwise_one_process_on_the_ranks_rows(ranks[0]["compact"], split, "compact")
    # Compacted: every layer holds its kept ranks only, 28 in all.
    shapes = ranks[0]["compact"]["shapes"]
    assert sum(s[0] for n, s in shapes.items() if n.endswith("lora_E")) == SCHEDULE["target_r"] * 14
    # Each checkpointed block ends an autograd graph of its own, where the first adapter gradients
    # arrive: more than one reduction per step, the average still exact.
    assert ranks[0]["compact"]["reductions"] > SCHEDULE["total_step"]


def test_triton_scorer_on_the_sharded_model(sharded_run):
    ranks, _ = sharded_run
    assert_ranks_alike(ranks, "triton")
    single = train(
        make_model(seed=20, schedule=SHORT, backend="triton"), rows_of(None), range(SHORT["total_step"])
    )
    assert_equals_one_process(ranks[0]["triton"], single, "triton")


def test_bf16_mixed_precision_policy(sharded_run):
    ranks, _ = sharded_run
    assert_ranks_alike(ranks, "mixed")
    mixed = ranks[0]["mixed"]
    assert mixed["dtypes"] == ["torch.float32"]  # FSDP2 computes in bf16; parameters stay fp32
    # One process computing what FSDP2 computes: the base in bf16, the fp32 adapters, bf16 activations.
    single_model = make_model(seed=30, schedule=SHORT, backend="torch")
    for name, p in single_model.named_parameters():
        if not p.requires_grad and not name.endswith("ranknum"):
            p.data = p.data.to(torch.bfloat16)
    single = train(single_model, rows_of(None), range(SHORT["total_step"]))
    assert mixed["budgets"] == single["budgets"]
    assert all(torch.isfinite(torch.tensor(mixed["losses"])))
    for n, w in single["weights"].items():
        assert mixed["weights"][n].dtype == torch.float32
        torch.testing.assert_close(
            mixed["weights"][n], w, rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}"
        )
    # ... and FSDP2 did compute in bf16: an fp32 run is farther away than that.
    fp32 = train(
        make_model(seed=30, schedule=SHORT, backend="torch"), rows_of(None), range(SHORT["total_step"])
    )
    gap = max(float((fp32["weights"][n] - w).abs().max()) for n, w in mixed["weights"].items())
    assert gap > 1e-4, gap


def test_resume_from_pretrained_then_shard_is_exact(sharded_run):
    ranks, _ = sharded_run
    assert_ranks_alike(ranks, "resumed")
    plain, resumed = ranks[0]["plain"], ranks[0]["resumed"]
    assert resumed["budgets"] == plain["budgets"][RESUME_AT + 1 :]
    assert resumed["patterns"] == plain["patterns"][RESUME_AT + 1 :]
    for n, w in plain["weights"].items():
        assert torch.equal(resumed["weights"][n], w), n


def test_save_pretrained_from_rank_0_loads_in_one_process(sharded_run, tmp_path):
    ranks, out = sharded_run
    loaded = af.AdaLoraModel.from_pretrained(tiny_llama(2), out / "final", is_trainable=True)
    weights = ranks[0]["plain"]["weights"]
    assert loaded.rank_pattern == ranks[0]["plain"]["patterns"][-1]
    for n, w in adapter_weights(loaded).items():
        assert torch.equal(w, weights[n]), n
    # The same PEFT files as one process saving its own (equal) weights.
    single = make_model(seed=0)
    with torch.no_grad():
        for n, p in single.named_parameters():
            if n in weights:
                p.copy_(weights[n])
    single.rank_allocator.load_state_dict(loaded.rank_allocator.state_dict(), "test")
    single.save_pretrained(tmp_path / "single")
    assert json.loads((tmp_path / "single" / "adapter_config.json").read_text()) == json.loads(
        (out / "final" / "adapter_config.json").read_text()
    )
    from safetensors.torch import load_file

    ours = load_file(out / "final" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---- checks that need no process group -------------------------------------------------------------


def test_default_blocks_are_the_decoder_layers_innermost_first():
    from adalora_fast.integrations.fsdp import find_blocks, replicated_parameters

    model = make_model(seed=0)
    blocks = find_blocks(model, None)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    assert blocks[0] is model.model.model.layers[1]
    assert find_blocks(model, ["model.model.layers.0"]) == [model.model.model.layers[0]]
    layer_type = type(model.model.model.layers[0])
    assert find_blocks(model, [layer_type]) == blocks
    # Replicated: A, E, B and ranknum of each of the 14 adapted layers; nothing of the base.
    replicated = replicated_parameters(model)
    assert len(replicated) == 14 * 4
    base_ids = {id(layer.base_layer.weight) for _, layer in model.adapted_layers}
    assert not base_ids & {id(p) for p in replicated}


if __name__ == "__main__":
    run_rank({"shard": _rank_shard})
