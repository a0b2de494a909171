"""FSDP2 for AdaLoRA: the frozen base sharded, the adapters replicated (:func:`fully_shard`).

What outgrows one GPU is the frozen base (70B parameters are 140 GB of bf16), not the adapters (about
155M parameters at r 12 on a 70B model). So each transformer block and the root are handed to torch's
FSDP2 (``torch.distributed.fsdp.fully_shard``) with every adapter tensor, ``ranknum`` and every other
trainable parameter in ``ignored_params``: FSDP2 shards, gathers and frees the base weights; the
adapters stay ordinary whole tensors on every rank, which is what the rank allocator, the regulariser,
compaction and checkpoints need. FSDP2 neither broadcasts nor reduces ignored parameters, so
:class:`ReplicatedGradSync` does both: the adapters are broadcast from rank 0 once, and at the end of
every backward their gradients are averaged over the mesh in one flat bucket per dtype (skipped while
FSDP2's ``set_requires_gradient_sync(False)`` holds, as for gradient accumulation without sync).
Under a ``MixedPrecisionPolicy(param_dtype=...)`` the adapters compute in their own dtype, as without
FSDP2, while the other trained parameters (trained biases, ``modules_to_save``), which FSDP2 does not
cast either, compute in ``param_dtype`` like the base around them (:class:`ComputeCast`).

Averaging a gradient that is already alike on every rank leaves it unchanged, so a reduction that runs
more than once in a step (re-entrant activation checkpointing ends one autograd graph per block) still
gives the exact average; it only costs more collectives.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import FULLY_SHARD_ATTR, ddp_forward_active
from ..layer import adapter_generation
from ..model import AdaLoraModel

# The first torch whose FSDP2 fully_shard takes ignored_params, which keeps the adapters whole.
NEEDED_TORCH = "2.7"


def _fsdp2() -> tuple[Any, type]:
    """torch's FSDP2 ``fully_shard`` and ``FSDPModule``; a ``RuntimeError`` naming the torch needed when
    this torch's ``fully_shard`` cannot leave parameters alone (checked before anything changes)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        fully_shard = FSDPModule = None
    if fully_shard is None or not _takes_ignored_params(fully_shard):
        raise RuntimeError(
            f"adalora_fast.fully_shard needs torch >= {NEEDED_TORCH}, whose FSDP2 fully_shard takes "
            f"ignored_params (the adapters stay whole on every rank); this is torch {torch.__version__}: "
            f"upgrade torch (pip install 'torch>={NEEDED_TORCH}'), or train with "
            "torch.nn.parallel.DistributedDataParallel"
        )
    return fully_shard, FSDPModule


def _takes_ignored_params(shard: Any) -> bool:
    try:
        return "ignored_params" in inspect.signature(shard).parameters
    except (TypeError, ValueError):  # no signature to read: let torch's own call decide
        return True


def replicated_parameters(model: AdaLoraModel) -> list[nn.Parameter]:
    """The parameters :func:`fully_shard` keeps whole on every rank: each adapted layer's own (A, E, B,
    ``ranknum``; not its base layer's) and every other parameter that trains (task heads, biases)."""
    out: dict[int, nn.Parameter] = {}
    for _, layer in model.adapted_layers:
        for p in layer._parameters.values():
            if p is not None:
                out[id(p)] = p
    for p in model.parameters():
        if p.requires_grad:
            out[id(p)] = p
    return list(out.values())


def find_blocks(model: AdaLoraModel, blocks: Iterable[str | type[nn.Module]] | None) -> list[nn.Module]:
    """The modules to shard one by one, innermost first: those whose class is in ``blocks`` (types or
    class names) or whose name in ``model.named_modules()`` is; by default the classes the base model
    lists in ``_no_split_modules`` (transformers' decoder / encoder layers)."""
    if blocks is None:
        names = list(getattr(model.model, "_no_split_modules", None) or [])
        if not names:
            raise ValueError(
                f"adalora_fast.fully_shard: {type(model.model).__name__} lists no _no_split_modules; name "
                "the transformer blocks to shard, e.g. fully_shard(model, blocks=['LlamaDecoderLayer'])"
            )
        wanted: list[str | type[nn.Module]] = names
    else:
        wanted = list(blocks)
        if not wanted:
            raise ValueError("adalora_fast.fully_shard: blocks is empty")
    types = tuple(b for b in wanted if isinstance(b, type))
    strings = {b for b in wanted if isinstance(b, str)}
    bad = [b for b in wanted if not isinstance(b, (str, type))]
    if bad:
        raise TypeError(f"adalora_fast.fully_shard: blocks holds {bad[0]!r}; give module classes or names")
    found = [
        m
        for name, m in model.named_modules()
        if m is not model and (isinstance(m, types) or type(m).__name__ in strings or name in strings)
    ]
    if not found:
        raise ValueError(f"adalora_fast.fully_shard: no module of the model matches blocks={wanted!r}")
    return found[::-1]  # named_modules lists parents first; FSDP2 wants children sharded first


class ReplicatedGradSync:
    """Broadcast and gradient averaging for the parameters FSDP2 leaves alone (see the module doc)."""

    def __init__(self, model: AdaLoraModel, mesh: Any) -> None:
        self.model = model
        self.groups = mesh.get_all_groups()
        self.world = mesh.size()
        self.params: list[nn.Parameter] = []
        self._handles: list[Any] = []
        self._queued = False
        self._ddp_syncs = False  # the last forward ran inside DDP, which then averages the adapters
        self._generation: int | None = None  # adapter_generation() at the last walk of the layers
        self.reductions = 0  # bucketed all-reduces run (tests and users can see the collectives)
        self.compute_cast: ComputeCast | None = None  # set by fully_shard under a param_dtype policy
        self.refresh()
        self._pre_hook = model.register_forward_pre_hook(lambda *_: self._before_forward())

    def _before_forward(self) -> None:
        # A backward that raised never ran the reduction it queued; without this reset _on_grad would
        # take it as still pending and never queue one again.
        self._queued = False
        self._ddp_syncs = ddp_forward_active()
        self.refresh()

    # ---- which parameters ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Hook the replicated parameters again if they were replaced (``SVDLinear.resize``, as in loading
        a checkpoint of other ranks); compaction and ``load_adapter`` keep the same objects. Runs before
        every forward, and walks the layers only when some layer replaced its parameters since."""
        generation = adapter_generation()
        if generation == self._generation:
            return
        self._generation = generation
        params = replicated_parameters(self.model)
        if len(params) == len(self.params) and all(map(lambda a, b: a is b, params, self.params)):
            return
        for h in self._handles:
            h.remove()
        self.params = params
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in params if p.requires_grad
        ]

    # ---- broadcast ----------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast(self) -> None:
        """Every rank takes rank 0's replicated parameters (the first rank of each mesh dimension in
        turn, so mesh coordinate (0, ..., 0) in the end)."""
        for tensors in _buckets(self.params):
            flat = torch.cat([t.reshape(-1) for t in tensors])
            for group in self.groups:
                dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
            for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                t.copy_(chunk.view_as(t))

    # ---- gradients ----------------------------------------------------------------------------
    def _on_grad(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def sync_enabled(self) -> bool:
        """False while FSDP2's ``set_requires_gradient_sync(False)`` holds on the root (accelerate's
        ``no_sync`` and Trainer's gradient accumulation call it there)."""
        groups = _param_groups(self.model)
        if not groups:
            groups = [g for m in self.model.modules() if m is not self.model for g in _param_groups(m)]
        return not groups or any(map(_reduces_grads, groups))

    @torch.no_grad()
    def _reduce(self) -> None:
        self._queued = False
        if self._ddp_syncs or not self.sync_enabled():
            return
        trained = [p for p in self.params if p.requires_grad]
        for params in _buckets(trained):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            for group in self.groups:
                dist.all_reduce(flat, group=group)
            flat.div_(self.world)
            for p, g, chunk in zip(params, grads, flat.split([g.numel() for g in grads]), strict=True):
                if p.grad is None:
                    p.grad = chunk.view_as(p).clone()
                else:
                    g.copy_(chunk.view_as(g))
            self.reductions += 1


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by (device, dtype), in order of first appearance."""
    out: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return list(out.values())


def _reduces_grads(group: Any) -> bool:
    """FSDP2's gradient sync flag of a parameter group: ``reduce_grads``, ``reduce_scatter_grads`` before."""
    flag = getattr(group, "reduce_grads", None)
    return bool(getattr(group, "reduce_scatter_grads", True) if flag is None else flag)


def _param_groups(module: nn.Module) -> list[Any]:
    """The FSDP2 parameter groups of ``module`` (none if it is not an FSDP2 module)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None:
        return []
    state = get_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12: a list
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


class ComputeCast:
    """FSDP2's ``param_dtype`` for the trained parameters it ignores besides the adapters (trained biases,
    ``modules_to_save``). FSDP2 computes with ``param_dtype`` copies of the weights it manages, so an
    fp32 bias beside a bf16 weight, or an fp32 head fed bf16 activations, would not run. While the module
    that uses such a parameter runs, a ``param_dtype`` copy (a differentiable cast) stands in its place:
    the module computes as FSDP2's own would, and the gradient reaches the fp32 parameter, which the
    optimizer, the gradient sync and checkpoints hold as before."""

    def __init__(self, model: AdaLoraModel, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.handles: list[Any] = []
        for runner, slots in _cast_slots(model, dtype).items():
            stack: list[list[torch.Tensor]] = []  # one entry per running call (re-entrant forwards)
            self.handles.append(runner.register_forward_pre_hook(self._swap_in(slots, stack)))
            # always_call: the parameters come back also when the forward raises.
            self.handles.append(runner.register_forward_hook(self._swap_out(slots, stack), always_call=True))

    def _swap_in(self, slots: list[tuple[nn.Module, str]], stack: list[list[torch.Tensor]]) -> Any:
        def hook(*_: Any) -> None:
            stack.append([owner._parameters[name] for owner, name in slots])
            for (owner, name), p in zip(slots, stack[-1], strict=True):
                owner._parameters[name] = p.to(self.dtype)  # as FSDP2 swaps its unsharded params in

        return hook

    def _swap_out(self, slots: list[tuple[nn.Module, str]], stack: list[list[torch.Tensor]]) -> Any:
        def hook(*_: Any) -> None:
            if stack:
                for (owner, name), p in zip(slots, stack.pop(), strict=True):
                    owner._parameters[name] = p

        return hook


def _cast_slots(model: AdaLoraModel, dtype: torch.dtype) -> dict[nn.Module, list[tuple[nn.Module, str]]]:
    """``{module to hook: [(owner, parameter name)]}`` for each trained floating-point parameter of
    ``model`` that is not an adapter and not of ``dtype``. An adapted layer's base bias is hooked on the
    adapted layer, whose forward reads it (the Triton path) before its base layer runs."""
    adapter_ids = {id(p) for _, layer in model.adapted_layers for p in layer._parameters.values()}
    runner_of = {id(layer.base_layer): layer for _, layer in model.adapted_layers}
    out: dict[nn.Module, list[tuple[nn.Module, str]]] = {}
    for owner in model.modules():
        for name, p in owner._parameters.items():
            if p is None or id(p) in adapter_ids or not p.requires_grad:
                continue
            if p.is_floating_point() and p.dtype != dtype:
                out.setdefault(runner_of.get(id(owner), owner), []).append((owner, name))
    return out


def fully_shard(
    model: AdaLoraModel,
    mesh: Any = None,
    *,
    blocks: Iterable[str | type[nn.Module]] | None = None,
    **fsdp_kwargs: Any,
) -> AdaLoraModel:
    """Shard ``model``'s frozen base with FSDP2 and keep its adapters replicated; returns ``model``
    (now also an ``FSDPModule``: ``set_requires_gradient_sync``, ``reshard``, ...).

    ``mesh``: a 1-D ``DeviceMesh`` (FSDP) or 2-D (HSDP); by default all ranks of the default process
    group, on the base weights' device type (CUDA for a base on the CPU under NCCL; the current device,
    ``torch.cuda.set_device``). ``blocks``: the modules sharded one by one
    (classes, class names or module names); by default the base model's ``_no_split_modules``. The
    root is sharded last. ``fsdp_kwargs`` go to every ``torch.distributed.fsdp.fully_shard`` call
    (``mp_policy``, ``reshard_after_forward``, ``offload_policy``, ...); ``ignored_params`` given there
    are ignored in addition to the adapters. Under ``mp_policy=MixedPrecisionPolicy(param_dtype=...)``
    the adapters compute in their own dtype and the other trained parameters (biases, modules to save)
    in ``param_dtype`` (:class:`ComputeCast`); all of them stay in their own dtype between steps.

    Every rank must hold the same base weights (as loaded by ``from_pretrained``); the adapters are
    broadcast from rank 0 here, so ranks seeded differently start alike. Call it after
    ``get_adalora_model`` / ``AdaLoraModel.from_pretrained`` and before creating the optimizer.
    """
    shard, fsdp_module = _fsdp2()
    if not isinstance(model, AdaLoraModel):
        raise TypeError(
            f"adalora_fast.fully_shard takes the AdaLoraModel from get_adalora_model or "
            f"AdaLoraModel.from_pretrained, not {type(model).__name__} (shard before DDP / torch.compile)"
        )
    already = [n or "<root>" for n, m in model.named_modules() if isinstance(m, fsdp_module)]
    if already or model.__dict__.get(FULLY_SHARD_ATTR) is not None:
        raise RuntimeError(
            f"adalora_fast.fully_shard: the model is already sharded (FSDP2 on {(already or ['<root>'])[0]})"
        )
    if not model.is_trainable:
        raise ValueError(
            "adalora_fast.fully_shard shards a model for training; this one has is_trainable=False"
        )
    to_shard = find_blocks(model, blocks)  # checked before anything changes
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "adalora_fast.fully_shard needs torch.distributed initialised: call "
            "torch.distributed.init_process_group() first (torchrun sets the rendezvous)"
        )
    replicated = replicated_parameters(model)
    ignored = set(fsdp_kwargs.pop("ignored_params", None) or ()) | set(replicated)
    ignored_ids = {id(p) for p in ignored}
    base_device = next((p.device for p in model.parameters() if id(p) not in ignored_ids), None)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        # Where the base lives, else CUDA when the process group speaks NCCL (a base loaded on the CPU
        # goes to the GPUs as FSDP2 shards it), else the CPU (gloo).
        device_type = base_device.type if base_device is not None and base_device.type != "cpu" else None
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    device = _mesh_device(mesh)
    with torch.no_grad():
        for p in replicated:  # FSDP2 moves what it shards to the mesh's device, not ignored params
            if p.device != device:
                p.data = p.data.to(device)
    sync = ReplicatedGradSync(model, mesh)
    sync.broadcast()
    for block in to_shard:
        shard(block, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    shard(model, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    param_dtype = getattr(fsdp_kwargs.get("mp_policy"), "param_dtype", None)
    if param_dtype is not None:
        sync.compute_cast = ComputeCast(model, param_dtype)
    # DDP wrapped around the sharded model (what transformers' Trainer and accelerate do on more than one
    # process without their FSDP plugin) leaves FSDP2's parameters alone and averages the adapters itself;
    # ReplicatedGradSync then stands aside for its backwards.
    model._ddp_params_and_buffers_to_ignore = [
        n for n, p in model.named_parameters() if id(p) not in {id(q) for q in replicated}
    ]
    model.__dict__[FULLY_SHARD_ATTR] = sync
    return model


def _mesh_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)
