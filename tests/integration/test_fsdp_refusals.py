"""Engines that would train the adapters wrongly under FSDP (FSDP1 in any strategy, a plain FSDP2
``fully_shard`` that shards the adapters, DeepSpeed ZeRO) are refused at the first training forward on 2
gloo processes, before any optimizer step; ``adalora_fast.fully_shard`` refuses bad input, and a torch
whose FSDP2 cannot leave the adapters alone, before it changes anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import adalora_fast as af
from tests.helpers import LLAMA_PROJ, batches, launch_ranks, peft_adalora, tiny_llama
from tests.integration.test_fsdp_helpers import (
    GLOBAL_BATCH,
    LAUNCH_TIMEOUT_S,
    LR,
    NEEDS_GLOO,
    SCHEDULE,
    SEQ,
    WORLD,
    first_step,
    make_model,
    rows_of,
    run_rank,
)

pytestmark = NEEDS_GLOO
PEFT_CASES = ("FSDP1 NO_SHARD", "no engine")
REFUSAL_WORDS = ("adalora_fast.fully_shard", "DistributedDataParallel", "on 2 processes")


# ---- the ranks (run as a script) ----------------------------------------------------------------------


def _rank_refuse(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    def fsdp2_everything(model):
        for layer in model.model.model.layers:
            torch_fully_shard(layer)
        return torch_fully_shard(model)

    def fsdp1(strategy: str, use_orig_params: bool = True):
        # use_orig_params=True: frozen and trained parameters may share a FlatParameter (accelerate's
        # default); on the CPU when told so.
        return lambda m: FSDP1(
            m, sharding_strategy=getattr(ShardingStrategy, strategy), use_orig_params=use_orig_params,
            device_id=torch.device("cpu"),
        )  # fmt: skip

    cases = {
        "FSDP1 FULL_SHARD": fsdp1("FULL_SHARD"),
        "FSDP1 SHARD_GRAD_OP": fsdp1("SHARD_GRAD_OP"),
        "FSDP1 NO_SHARD": fsdp1("NO_SHARD"),
        "FSDP2 on everything": fsdp2_everything,
        "FSDP2 on one block": lambda m: (torch_fully_shard(m.model.model.layers[1]), m)[1],
        "no engine": lambda m: m,
    }
    record: dict[str, object] = {
        name: first_step(wrap(make_model(seed=rank)), rank) for name, wrap in cases.items()
    }
    # A PEFT model accelerated in place: the same rule at its first training forward.
    for name in PEFT_CASES:
        pm = peft_adalora(tiny_llama(2), LLAMA_PROJ, seed=rank, total_step=SCHEDULE["total_step"])
        af.accelerate_peft(pm)
        record[f"PEFT in place, {name}"] = first_step(cases[name](pm), rank)
    # use_orig_params=False cannot even wrap frozen and trained parameters together: torch refuses.
    try:
        fsdp1("NO_SHARD", use_orig_params=False)(make_model(seed=rank))
        record["FSDP1 flat"] = None
    except ValueError as e:
        record["FSDP1 flat"] = str(e)
    # Inference under FSDP1 is not training: allowed.
    with torch.no_grad():
        x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][rows_of(rank)]
        record["FSDP1 eval"] = bool(
            torch.isfinite(cases["FSDP1 FULL_SHARD"](make_model(seed=rank))(input_ids=x).logits).all()
        )
    # A loop that says it synchronises the gradients itself is trusted by the forward; the allocator
    # still refuses adapters that FSDP2 sharded (its own check, naming the first sharded tensor).
    model = make_model(seed=rank)
    model.gradients_synchronised_by_user = True
    record["user sync"] = first_step(model, rank)
    sharded = make_model(seed=rank)
    sharded.gradients_synchronised_by_user = True
    record["user sync, FSDP2 on one block"] = first_step(cases["FSDP2 on one block"](sharded), rank)
    (out / f"refuse_rank{rank}.json").write_text(json.dumps(record))


def _rank_deepspeed(rank: int, out: Path) -> None:
    import os

    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    record = {}
    for stage in (2, 3):
        model = make_model(seed=rank)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
        x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][rows_of(rank)]
        try:
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            record[f"ZeRO-{stage}"] = None
        except RuntimeError as e:
            record[f"ZeRO-{stage}"] = str(e)
    (out / f"deepspeed_rank{rank}.json").write_text(json.dumps(record))


# ---- tests --------------------------------------------------------------------------------------------


def test_engines_that_would_train_wrongly_are_refused_before_the_first_step(tmp_path):
    launch_ranks(__file__, "refuse", tmp_path, WORLD, LAUNCH_TIMEOUT_S)
    engines = {
        "FSDP1 FULL_SHARD": "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel",
        "FSDP1 SHARD_GRAD_OP": "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel",
        "FSDP1 NO_SHARD": "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel",
        "FSDP2 on everything": "FSDP2 with the adapters sharded",
        "FSDP2 on one block": "FSDP2 with the adapters sharded",
        "no engine": "an engine other than DistributedDataParallel",
    }
    for r in range(WORLD):
        record = json.loads((tmp_path / f"refuse_rank{r}.json").read_text())
        for case, engine in [*engines.items(), *((f"PEFT in place, {c}", engines[c]) for c in PEFT_CASES)]:
            assert record[case] is not None, f"{case} trained"
            kind, message, where = record[case]
            assert (kind, where) == ("RuntimeError", "forward"), (case, kind, where, message)
            assert message.startswith(f"adalora_fast cannot train under {engine}"), (case, message)
            for word in REFUSAL_WORDS:
                assert word in message, (case, word, message)
        assert "uniform `requires_grad`" in record["FSDP1 flat"], record["FSDP1 flat"]
        assert record["FSDP1 eval"] is True
        assert record["user sync"] is None
        kind, message, where = record["user sync, FSDP2 on one block"]
        assert (kind, where) == ("NotImplementedError", "allocator"), (kind, where, message)
        assert message.startswith("model.layers.1.") and "adalora_fast.fully_shard" in message, message


def test_deepspeed_zero_is_refused_before_the_first_step(tmp_path):
    pytest.importorskip("deepspeed")
    launch_ranks(__file__, "deepspeed", tmp_path, WORLD, LAUNCH_TIMEOUT_S)
    for r in range(WORLD):
        record = json.loads((tmp_path / f"deepspeed_rank{r}.json").read_text())
        for stage, engine in (("ZeRO-2", "DeepSpeed on"), ("ZeRO-3", "DeepSpeed ZeRO-3 on")):
            message = record[stage]
            assert message is not None, f"DeepSpeed {stage} trained"
            assert message.startswith(f"adalora_fast cannot train under {engine}"), message
            for word in REFUSAL_WORDS:
                assert word in message, (stage, word, message)


def test_fully_shard_refuses_bad_input_before_changing_anything():
    model = make_model(seed=0)
    with pytest.raises(TypeError, match="takes the AdaLoraModel"):
        af.fully_shard(model.model)
    with pytest.raises(ValueError, match="no module of the model matches blocks="):
        af.fully_shard(model, blocks=["NoSuchLayer"])
    with pytest.raises(TypeError, match="blocks holds 3"):
        af.fully_shard(model, blocks=[3])
    with pytest.raises(ValueError, match="blocks is empty"):
        af.fully_shard(model, blocks=[])
    plain = af.get_adalora_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)), af.AdaLoraConfig(target_modules=["0"], total_step=4)
    )
    with pytest.raises(ValueError, match="lists no _no_split_modules; name the transformer blocks"):
        af.fully_shard(plain)
    frozen = af.get_adalora_model(
        tiny_llama(2), af.AdaLoraConfig(target_modules=LLAMA_PROJ, inference_mode=True)
    )
    with pytest.raises(ValueError, match="is_trainable=False"):
        af.fully_shard(frozen)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            af.fully_shard(model)
    assert "_adalora_replicated" not in model.__dict__
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def _fully_shard_of_torch_2_6(
    module, *, mesh=None, reshard_after_forward=True, mp_policy=None, offload_policy=None
):
    """torch 2.6's FSDP2 signature: no ``ignored_params``."""
    raise AssertionError("adalora_fast.fully_shard called a fully_shard that would shard the adapters")


def test_a_torch_whose_fsdp2_cannot_ignore_the_adapters_is_refused_before_anything_changes(monkeypatch):
    import torch.distributed.fsdp as torch_fsdp

    model = make_model(seed=0)
    monkeypatch.setattr(torch_fsdp, "fully_shard", _fully_shard_of_torch_2_6)
    needed = r"needs torch >= 2\.7, whose FSDP2 fully_shard takes ignored_params .*upgrade torch"
    with pytest.raises(RuntimeError, match=needed):
        af.fully_shard(model)
    monkeypatch.delattr(torch_fsdp, "fully_shard")  # older still: no FSDP2 under torch.distributed.fsdp
    with pytest.raises(RuntimeError, match=needed):
        af.fully_shard(model)
    assert "_adalora_replicated" not in model.__dict__
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


if __name__ == "__main__":
    run_rank({"refuse": _rank_refuse, "deepspeed": _rank_deepspeed})
