"""transformers' ``Trainer`` with ``AdaLoraCallback`` on a model sharded by ``adalora_fast.fully_shard``, on
2 gloo processes: accelerate wraps it in DDP (no FSDP plugin on the CPU), which leaves FSDP2's parameters
alone and averages the adapters; the ranks end alike and equal one process, checkpoints from rank 0
resume exactly and load in one process.
"""

from __future__ import annotations

from pathlib import Path

import torch

import adalora_fast as af
from tests.helpers import launch_ranks, tiny_llama
from tests.integration.test_fsdp_helpers import (
    GLOBAL_BATCH,
    LAUNCH_TIMEOUT_S,
    LR,
    NEEDS_GLOO,
    RESUME_AT,
    SCHEDULE,
    SEQ,
    WORLD,
    adapter_weights,
    assert_equals_one_process,
    assert_ranks_alike,
    make_model,
    run_rank,
)

pytestmark = NEEDS_GLOO


# ---- the ranks (run as a script) ----------------------------------------------------------------------


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
    return {**seen, "weights": adapter_weights(model)}


def _rank_trainer(rank: int, out: Path) -> None:
    """Trainer on the sharded model: accelerate wraps it in DDP (no FSDP plugin on the CPU), which leaves
    FSDP2's parameters alone and averages the adapters. Checkpoints from rank 0; resume."""
    import os

    # accelerate reads the launcher's variables; the process group already exists (no port is opened).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="1")  # fmt: skip
    per_device = GLOBAL_BATCH // 2 // WORLD
    results = {"full": _trainer_run(af.fully_shard(make_model(seed=rank)), out / "trainer", per_device)}
    checkpoint = out / "trainer" / f"checkpoint-{RESUME_AT + 1}"
    resumed = af.fully_shard(make_model(seed=50 + rank))
    results["resumed"] = _trainer_run(resumed, out / "trainer_resumed", per_device, resume=checkpoint)
    torch.save(results, out / f"trainer_rank{rank}.pt")


# ---- tests --------------------------------------------------------------------------------------------


def test_trainer_with_the_callback_on_the_sharded_model(tmp_path):
    launch_ranks(__file__, "trainer", tmp_path, WORLD, LAUNCH_TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"trainer_rank{r}.pt") for r in range(WORLD)]
    for run in ("full", "resumed"):
        assert_ranks_alike(ranks, run)
    full = ranks[0]["full"]
    # One process on the whole batch (Trainer's sampler: the same global batches, seed 0).
    single = _trainer_run(make_model(seed=0), tmp_path / "single", GLOBAL_BATCH // 2)
    assert_equals_one_process(full, single, "trainer")
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


if __name__ == "__main__":
    run_rank({"trainer": _rank_trainer})
