"""Which data-parallel engine runs a training forward, and the refusal of those that would train the
adapters wrongly.

The allocator scores and masks every adapter tensor whole, on every rank alike, from gradients that are
already averaged over the ranks when ``optimizer.step()`` runs. Two engines give it that:
``torch.nn.parallel.DistributedDataParallel`` and :func:`adalora_fast.fully_shard` (FSDP2 with the frozen
base sharded and the adapters replicated). The others do not, and some of them train silently wrong
(FSDP1 ``NO_SHARD`` loses the regulariser's gradient), so a training forward run by more than one
process under anything else is refused before the first optimizer step.
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist
from torch import nn

# A loop that all-reduces the adapter gradients itself sets this attribute on the AdaLoraModel.
USER_SYNC_ATTR = "gradients_synchronised_by_user"
# Set on the AdaLoraModel by adalora_fast.fully_shard (its gradient synchroniser).
FULLY_SHARD_ATTR = "_adalora_replicated"


def _active_ddp() -> nn.Module | None:
    """The DDP module whose forward is running (DDP records it for dynamo), or None."""
    ddp = getattr(sys.modules.get("torch.nn.parallel.distributed"), "DistributedDataParallel", None)
    return None if ddp is None else getattr(ddp, "_active_ddp_module", None)


def ddp_forward_active() -> bool:
    """True inside ``DistributedDataParallel.forward``."""
    return _active_ddp() is not None


def dtensor_possible() -> bool:
    """False while ``torch.distributed.tensor`` was never imported: no DTensor can exist then."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None) is not None


def is_dtensor(t: object) -> bool:
    """``isinstance(t, DTensor)`` without importing ``torch.distributed.tensor``."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


# Set on a DDP module: the Join config found left over from a Join block that has ended.
_STALE_JOIN_ATTR = "_adalora_stale_join_config"


def _join_alive(ddp: nn.Module) -> bool:
    """True while a ``torch.distributed.algorithms.join.Join`` object holding ``ddp`` exists. A ``with
    Join([ddp]):`` statement holds its Join only until the block ends (nothing else refers to it); a
    Join the caller keeps in a variable counts as running until it is dropped."""
    join_cls = getattr(sys.modules.get("torch.distributed.algorithms.join"), "Join", None)
    if join_cls is None:
        return False
    for holder in gc.get_referrers(ddp):  # Join._joinables, the list (or tuple) that names ddp
        if isinstance(holder, (list, tuple)) and any(
            isinstance(owner, join_cls) or (isinstance(owner, dict) and owner.get("_joinables") is holder)
            for owner in gc.get_referrers(holder)
        ):
            return True
    return False


def _inside_uneven_join(ddp: nn.Module) -> bool:
    """True inside a DDP ``Join`` block that lets ranks run out of data one by one.

    ``Join`` sets ``ddp._join_config`` when it is built and never resets it, so the config alone cannot
    tell a running block from one that ended (say an evaluation under ``Join`` before training). Whether
    the Join still exists tells; a config found with no Join left is remembered, so that look (a walk of
    the garbage collector's referrers) runs once per Join."""
    join = getattr(ddp, "_join_config", None)
    if join is None or not join.enable or join.throw_on_early_termination:
        return False
    if ddp.__dict__.get(_STALE_JOIN_ATTR) is join:
        return False
    if _join_alive(ddp):
        return True
    ddp.__dict__[_STALE_JOIN_ATTR] = join
    return False


def engine_name(model: object) -> tuple[str, str]:
    """``(engine, what it does to the adapters)`` for a training forward of ``model`` (an AdaLoraModel)
    that neither DDP nor ``adalora_fast.fully_shard`` runs."""
    layers = getattr(model, "adapted_layers", None) or []
    tensors = [getattr(m, k, None) for _, m in layers for k in ("lora_A", "lora_E", "lora_B")]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel"),
                    "FullyShardedDataParallel", None)  # fmt: skip
    if any(hasattr(t, "ds_id") for t in tensors):
        return "DeepSpeed ZeRO-3", "partitions the adapter parameters themselves"
    ds_comm = getattr(sys.modules.get("deepspeed"), "comm", None)  # transformers imports deepspeed
    if ds_comm is not None and ds_comm.is_initialized():
        return "DeepSpeed", "keeps the adapter gradients in its own partitioned buffers (p.grad is None)"
    modules = model.modules() if isinstance(model, nn.Module) else ()
    if any(getattr(t, "_fsdp_flattened", False) or not isinstance(t, nn.Parameter) for t in tensors) or (
        fsdp1 is not None and any(isinstance(m, fsdp1) for m in modules)
    ):
        return (
            "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel, any sharding strategy)",
            "flattens the adapters into its FlatParameters",
        )
    if any(is_dtensor(t) for t in tensors):
        return (
            "FSDP2 with the adapters sharded (a plain torch fully_shard(model), or accelerate's / "
            "Trainer's FSDP2 plugin)",
            "shards every adapter tensor (DTensors)",
        )
    return "an engine other than DistributedDataParallel", "synchronises no adapter gradient it can see"


def check_training_engine(model: object, name: str = "model") -> None:
    """Refuse a training forward of ``model`` (an AdaLoraModel, or the driver of a PEFT model accelerated
    in place; ``name`` says how the user reaches it) run by more than one process under an engine other
    than DDP or ``adalora_fast.fully_shard``. Host cost on one process: one C call."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world == 1:
        return
    ddp = _active_ddp()
    if ddp is not None:
        if _inside_uneven_join(ddp):
            raise RuntimeError(
                "adalora_fast cannot train under DDP's Join context (uneven inputs): a rank that runs out of "
                "data stops calling optimizer.step() and update_and_allocate while the others go on, so "
                "the ranks' rank masks and adapters drift apart. Give every rank the same number of "
                "batches (a DistributedSampler with drop_last=True), or use "
                "Join([model], throw_on_early_termination=True) to stop all ranks together"
            )
        return
    if model.__dict__.get(FULLY_SHARD_ATTR) is not None or model.__dict__.get(USER_SYNC_ATTR, False):
        return
    engine, what = engine_name(model)
    raise RuntimeError(
        f"adalora_fast cannot train under {engine} on {world} processes: it {what}, while the rank "
        "allocator needs every adapter tensor whole and alike on every rank, with gradients averaged "
        "over the ranks before optimizer.step(). Use adalora_fast.fully_shard(model) (FSDP2: the frozen "
        "base sharded, the adapters replicated) or torch.nn.parallel.DistributedDataParallel(model). "
        f"(A loop that all-reduces the adapter gradients itself sets {name}.{USER_SYNC_ATTR} = True.)"
    )
