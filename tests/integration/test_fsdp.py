"""FSDP2 through ``adalora_fast.fully_shard`` on 2 gloo processes on the CPU: the frozen base sharded
(DTensors, half the rows per rank), the adapters replicated; with the ranks seeded differently, both
ranks end bit for bit alike and equal one process training on the whole batch (same budgets and rank
pattern at every step, adapter weights within fp32 rounding), also with gradient accumulation without
sync, gradient clipping, the Triton scorer, bf16 mixed precision, resume and checkpoints. Engines that
would train the adapters wrongly (FSDP1 in any strategy, a plain FSDP2 ``fully_shard`` that shards the
adapters, DeepSpeed ZeRO) are refused at the first training forward, before any optimizer step.

One launch per group of scenarios (``tests.helpers.launch_ranks``); each rank writes what it saw and
the test judges it against a one-process run.
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
# 14 adapted matrices (2 Llama layers x 7), budget 84 -> 28: warm-up steps 0-2, mask steps 4, 6, 8, the
# final mask at step 9, the recorded pattern re-applied at steps 10 and 11.
SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
SHORT = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 6}
COMPACTING = {"checkpointing": True, "compact_after_final": True, "orth_reg_weight": 0.0}
RESUME_AT = 5  # the checkpoint of the resume scenario is written after this step
KINDS = ("lora_A", "lora_E", "lora_B")
LAUNCH_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)


def _model(seed: int, schedule: dict = SCHEDULE, checkpointing: bool = False, **overrides) -> af.AdaLoraModel:
    """The tiny Llama (the same base weights everywhere) with adapters drawn after ``manual_seed(seed)``;
    ``checkpointing``: re-entrant activation checkpointing of its decoder layers (in train mode)."""
    base = tiny_llama(2)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.train()
    torch.manual_seed(seed)
    config = af.AdaLoraConfig(target_modules=LLAMA_PROJ, lora_dropout=0.0, **{**schedule, **overrides})
    return af.get_adalora_model(base, config)


def _adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inner = af.unwrap_model(model)
    return {n: p.detach().clone() for n, p in inner.named_parameters() if n.rsplit(".", 1)[-1] in KINDS}


def _train(
    model: torch.nn.Module,
    rows: slice,
    steps: range,
    *,
    micro: int = 1,
    clip: float | None = None,
    opt: torch.optim.Optimizer | None = None,
    on_step=None,
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
    return {"losses": losses, "budgets": budgets, "patterns": patterns, "weights": _adapter_weights(model)}


def _one_thread_train(*args, **kwargs) -> dict:
    """:func:`_train` on one CPU thread, as each rank runs (``init_gloo``): the same matmul blocking."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _rows(rank: int | None) -> slice:
    if rank is None:
        return slice(None)
    per_rank = GLOBAL_BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


# ---- the ranks (run as a script) ----------------------------------------------------------------------


def _rank_shard(rank: int, out: Path) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    results: dict[str, object] = {}
    # 1. The whole schedule, seeded differently per rank; a checkpoint for the resume run on the way.
    model = af.fully_shard(_model(seed=rank))
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

    results["plain"] = _train(model, _rows(rank), range(SCHEDULE["total_step"]), on_step=save_midway)
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
    results["resumed"] = _train(resumed, _rows(rank), range(RESUME_AT + 1, SCHEDULE["total_step"]), opt=opt)

    # 3. Two micro-batches per step, the first without gradient sync, and gradient clipping.
    accum = af.fully_shard(_model(seed=10 + rank))
    results["accum"] = _train(accum, _rows(rank), range(SCHEDULE["total_step"]), micro=2, clip=0.5)
    results["accum"]["reductions"] = accum._adalora_replicated.reductions

    # 4. Compaction at the final pattern, under re-entrant activation checkpointing (no regulariser,
    # whose gradient would reach the adapters in the outer autograd graph first).
    compacting = af.fully_shard(_model(seed=40 + rank, **COMPACTING))
    results["compact"] = _train(compacting, _rows(rank), range(SCHEDULE["total_step"]))
    results["compact"]["reductions"] = compacting._adalora_replicated.reductions
    results["compact"]["shapes"] = {n: tuple(w.shape) for n, w in results["compact"]["weights"].items()}

    # 5. The Triton scorer and regulariser (the interpreter) on the sharded model, a short schedule.
    triton = af.fully_shard(_model(seed=20 + rank, schedule=SHORT, backend="triton"))
    results["triton"] = _train(triton, _rows(rank), range(SHORT["total_step"]))

    # 6. FSDP2's bf16 mixed precision (bf16 compute of the base, fp32 gradient reduction), torch path.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = af.fully_shard(_model(seed=30 + rank, schedule=SHORT, backend="torch"), mp_policy=policy)
    results["mixed"] = _train(mixed, _rows(rank), range(SHORT["total_step"]))
    results["mixed"]["dtypes"] = sorted({str(p.dtype) for p in mixed.parameters()})
    torch.save(results, out / f"shard_rank{rank}.pt")


def _first_step(wrapped: torch.nn.Module, rank: int) -> list | None:
    """One training step of ``wrapped`` on this rank's rows: None if it ran, else the error as
    ``[type, message, where]`` (``where``: "forward", "backward", "step" or "allocator")."""
    x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][_rows(rank)]
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
        name: _first_step(wrap(_model(seed=rank)), rank) for name, wrap in cases.items()
    }
    # A PEFT model accelerated in place: the same rule at its first training forward.
    for name in PEFT_CASES:
        pm = peft_adalora(tiny_llama(2), LLAMA_PROJ, seed=rank, total_step=SCHEDULE["total_step"])
        af.accelerate_peft(pm)
        record[f"PEFT in place, {name}"] = _first_step(cases[name](pm), rank)
    # use_orig_params=False cannot even wrap frozen and trained parameters together: torch refuses.
    try:
        fsdp1("NO_SHARD", use_orig_params=False)(_model(seed=rank))
        record["FSDP1 flat"] = None
    except ValueError as e:
        record["FSDP1 flat"] = str(e)
    # Inference under FSDP1 is not training: allowed.
    with torch.no_grad():
        x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][_rows(rank)]
        record["FSDP1 eval"] = bool(
            torch.isfinite(cases["FSDP1 FULL_SHARD"](_model(seed=rank))(input_ids=x).logits).all()
        )
    # A loop that says it synchronises the gradients itself is trusted by the forward; the allocator
    # still refuses adapters that FSDP2 sharded (its own check, naming the first sharded tensor).
    model = _model(seed=rank)
    model.gradients_synchronised_by_user = True
    record["user sync"] = _first_step(model, rank)
    sharded = _model(seed=rank)
    sharded.gradients_synchronised_by_user = True
    record["user sync, FSDP2 on one block"] = _first_step(cases["FSDP2 on one block"](sharded), rank)
    (out / f"refuse_rank{rank}.json").write_text(json.dumps(record))


def _rank_deepspeed(rank: int, out: Path) -> None:
    import os

    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    record = {}
    for stage in (2, 3):
        model = _model(seed=rank)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
        x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][_rows(rank)]
        try:
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            record[f"ZeRO-{stage}"] = None
        except RuntimeError as e:
            record[f"ZeRO-{stage}"] = str(e)
    (out / f"deepspeed_rank{rank}.json").write_text(json.dumps(record))


def _trainer_args(out: Path, per_device: int, **kw):
    from transformers import TrainingArguments

    defaults = dict(per_device_train_batch_size=per_device, learning_rate=LR, use_cpu=True, seed=0,
                    report_to="none", max_steps=SCHEDULE["total_step"], save_steps=RESUME_AT + 1,
                    logging_steps=100, dataloader_drop_last=True)  # fmt: skip
    return TrainingArguments(output_dir=str(out), **{**defaults, **kw})


def _trainer_run(model, out: Path, per_device: int, resume: Path | None = None) -> dict:
    """transformers' Trainer with AdaLoraCallback: the budgets and patterns it reached, the weights."""
    from transformers import Trainer, TrainerCallback

    from tests.integration.test_trainer import TokenDataset

    seen: dict[str, list] = {"budgets": [], "patterns": []}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            inner = af.unwrap_model(model)
            seen["budgets"].append(inner.rank_allocator.budget)
            seen["patterns"].append(inner.rank_pattern)

    data = TokenDataset(SCHEDULE["total_step"] * GLOBAL_BATCH // 2, seq=SEQ)
    trainer = Trainer(model=model, args=_trainer_args(out, per_device), train_dataset=data,
                      callbacks=[af.AdaLoraCallback(), Record()])  # fmt: skip
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return {**seen, "weights": _adapter_weights(model)}


def _rank_trainer(rank: int, out: Path) -> None:
    """Trainer on the sharded model: accelerate wraps it in DDP (no FSDP plugin on the CPU), which leaves
    FSDP2's parameters alone and averages the adapters. Checkpoints from rank 0; resume."""
    import os

    # accelerate reads the launcher's variables; the process group already exists (no port is opened).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="1")  # fmt: skip
    per_device = GLOBAL_BATCH // 2 // WORLD
    results = {"full": _trainer_run(af.fully_shard(_model(seed=rank)), out / "trainer", per_device)}
    checkpoint = out / "trainer" / f"checkpoint-{RESUME_AT + 1}"
    resumed = af.fully_shard(_model(seed=50 + rank))
    results["resumed"] = _trainer_run(resumed, out / "trainer_resumed", per_device, resume=checkpoint)
    torch.save(results, out / f"trainer_rank{rank}.pt")


def _rank_main(scenario: str, rank: int, store: str, out: Path) -> None:
    init_gloo(rank, WORLD, store)
    try:
        scenarios = {"shard": _rank_shard, "trainer": _rank_trainer, "refuse": _rank_refuse,
                     "deepspeed": _rank_deepspeed}  # fmt: skip
        scenarios[scenario](rank, out)
    finally:
        dist.destroy_process_group()


# ---- tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("fsdp2")
    launch_ranks(__file__, "shard", out, WORLD, LAUNCH_TIMEOUT_S)
    return [torch.load(out / f"shard_rank{r}.pt") for r in range(WORLD)], out


def _assert_ranks_alike(ranks: list[dict], run: str) -> None:
    for other in ranks[1:]:
        a, b = ranks[0][run], other[run]
        assert b["budgets"] == a["budgets"] and b["patterns"] == a["patterns"], run
        for n, w in a["weights"].items():
            assert torch.equal(b["weights"][n], w), (run, n)


def _assert_bitwise_one_process_on_the_ranks_rows(sharded: dict, single: dict, run: str) -> None:
    """``single``: one process (one thread, as each rank) taking each rank's rows as a micro-batch of its
    own (loss / WORLD): the same sums in the same order as the all-reduce, so the same weights bit for
    bit. (Against the whole batch in one micro-batch the weights differ by fp32 rounding only, then.)"""
    assert sharded["budgets"] == single["budgets"] and sharded["patterns"] == single["patterns"], run
    for n, w in single["weights"].items():
        assert torch.equal(sharded["weights"][n], w), (run, n)


def _assert_equals_one_process(sharded: dict, single: dict, run: str) -> None:
    assert sharded["budgets"] == single["budgets"], run
    assert sharded["patterns"] == single["patterns"], run
    assert sharded["weights"].keys() == single["weights"].keys()
    for n, w in single["weights"].items():
        torch.testing.assert_close(
            sharded["weights"][n], w, rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{run} {n}: {s}"
        )


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
    _assert_ranks_alike(ranks, "plain")
    single = _train(_model(seed=0), _rows(None), range(SCHEDULE["total_step"]))
    m = len(single["patterns"][0])
    # The schedule went through budget-phase masks and the final phase, and training moved the adapters.
    assert any(SCHEDULE["target_r"] * m < b < SCHEDULE["init_r"] * m for b in single["budgets"])
    assert single["budgets"][-1] == SCHEDULE["target_r"] * m
    initial = _adapter_weights(_model(seed=0))
    assert all(not torch.equal(single["weights"][n], initial[n]) for n in initial if "lora_E" not in n)
    _assert_equals_one_process(ranks[0]["plain"], single, "plain")
    split = _one_thread_train(_model(seed=0), _rows(None), range(SCHEDULE["total_step"]), micro=WORLD)
    _assert_bitwise_one_process_on_the_ranks_rows(ranks[0]["plain"], split, "plain")
    assert ranks[0]["plain"]["reductions"] == SCHEDULE["total_step"]  # one bucket per backward


def test_gradient_accumulation_without_sync_and_clipping(sharded_run):
    ranks, _ = sharded_run
    _assert_ranks_alike(ranks, "accum")
    # Rank r's two micro-batches are global rows 2r and 2r+1; one process takes all four rows at once.
    single = _train(_model(seed=10), _rows(None), range(SCHEDULE["total_step"]), clip=0.5)
    _assert_equals_one_process(ranks[0]["accum"], single, "accum")
    assert ranks[0]["accum"]["reductions"] == SCHEDULE["total_step"]  # none for the unsynced micro-batch


def test_compaction_under_reentrant_checkpointing(sharded_run):
    ranks, _ = sharded_run
    _assert_ranks_alike(ranks, "compact")
    steps = range(SCHEDULE["total_step"])
    whole = _train(_model(seed=40, **COMPACTING), _rows(None), steps)
    assert ranks[0]["compact"]["budgets"] == whole["budgets"]
    assert ranks[0]["compact"]["patterns"] == whole["patterns"]
    split = _one_thread_train(_model(seed=40, **COMPACTING), _rows(None), steps, micro=WORLD)
    _assert_bitwise_one_process_on_the_ranks_rows(ranks[0]["compact"], split, "compact")
    # Compacted: every layer holds its kept ranks only, 28 in all.
    shapes = ranks[0]["compact"]["shapes"]
    assert sum(s[0] for n, s in shapes.items() if n.endswith("lora_E")) == SCHEDULE["target_r"] * 14
    # Each checkpointed block ends an autograd graph of its own, where the first adapter gradients
    # arrive: more than one reduction per step, the average still exact.
    assert ranks[0]["compact"]["reductions"] > SCHEDULE["total_step"]


def test_triton_scorer_on_the_sharded_model(sharded_run):
    ranks, _ = sharded_run
    _assert_ranks_alike(ranks, "triton")
    single = _train(
        _model(seed=20, schedule=SHORT, backend="triton"), _rows(None), range(SHORT["total_step"])
    )
    _assert_equals_one_process(ranks[0]["triton"], single, "triton")


def test_bf16_mixed_precision_policy(sharded_run):
    ranks, _ = sharded_run
    _assert_ranks_alike(ranks, "mixed")
    mixed = ranks[0]["mixed"]
    assert mixed["dtypes"] == ["torch.float32"]  # FSDP2 computes in bf16; parameters stay fp32
    # One process computing what FSDP2 computes: the base in bf16, the fp32 adapters, bf16 activations.
    single_model = _model(seed=30, schedule=SHORT, backend="torch")
    for name, p in single_model.named_parameters():
        if not p.requires_grad and not name.endswith("ranknum"):
            p.data = p.data.to(torch.bfloat16)
    single = _train(single_model, _rows(None), range(SHORT["total_step"]))
    assert mixed["budgets"] == single["budgets"]
    assert all(torch.isfinite(torch.tensor(mixed["losses"])))
    for n, w in single["weights"].items():
        assert mixed["weights"][n].dtype == torch.float32
        torch.testing.assert_close(
            mixed["weights"][n], w, rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}"
        )
    # ... and FSDP2 did compute in bf16: an fp32 run is farther away than that.
    fp32 = _train(_model(seed=30, schedule=SHORT, backend="torch"), _rows(None), range(SHORT["total_step"]))
    gap = max(float((fp32["weights"][n] - w).abs().max()) for n, w in mixed["weights"].items())
    assert gap > 1e-4, gap


def test_resume_from_pretrained_then_shard_is_exact(sharded_run):
    ranks, _ = sharded_run
    _assert_ranks_alike(ranks, "resumed")
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
    for n, w in _adapter_weights(loaded).items():
        assert torch.equal(w, weights[n]), n
    # The same PEFT files as one process saving its own (equal) weights.
    single = _model(seed=0)
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


def test_trainer_with_the_callback_on_the_sharded_model(tmp_path):
    launch_ranks(__file__, "trainer", tmp_path, WORLD, LAUNCH_TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"trainer_rank{r}.pt") for r in range(WORLD)]
    for run in ("full", "resumed"):
        _assert_ranks_alike(ranks, run)
    full = ranks[0]["full"]
    # One process on the whole batch (Trainer's sampler: the same global batches, seed 0).
    single = _trainer_run(_model(seed=0), tmp_path / "single", GLOBAL_BATCH // 2)
    _assert_equals_one_process(full, single, "trainer")
    assert full["budgets"][-1] == SCHEDULE["target_r"] * 14
    # The checkpoint rank 0 wrote mid-run resumes exactly: the same steps after it, the same weights.
    resumed = ranks[0]["resumed"]
    assert resumed["budgets"] == full["budgets"][RESUME_AT + 1 :]
    assert resumed["patterns"] == full["patterns"][RESUME_AT + 1 :]
    for n, w in full["weights"].items():
        assert torch.equal(resumed["weights"][n], w), n
    # ... and loads in one process as a PEFT-format adapter with our training state.
    loaded = af.AdaLoraModel.from_pretrained(
        tiny_llama(2), tmp_path / "trainer" / f"checkpoint-{RESUME_AT + 1}", is_trainable=True
    )
    assert loaded.rank_pattern == full["patterns"][RESUME_AT]


PEFT_CASES = ("FSDP1 NO_SHARD", "no engine")
REFUSAL_WORDS = ("adalora_fast.fully_shard", "DistributedDataParallel", "on 2 processes")


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


# ---- checks that need no process group -------------------------------------------------------------


def test_default_blocks_are_the_decoder_layers_innermost_first():
    from adalora_fast.integrations.fsdp import find_blocks, replicated_parameters

    model = _model(seed=0)
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


def test_fully_shard_refuses_bad_input_before_changing_anything():
    model = _model(seed=0)
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


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
