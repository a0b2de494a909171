"""The gradient sync of the adapters that ``adalora_fast.fully_shard`` keeps whole
(``ReplicatedGradSync``) goes on averaging after a backward that raised, after ``load_adapter`` and after
layers replaced their factors (``SVDLinear.resize``), and walks the layers only when one did. On 2 gloo
processes (the ranks seeded differently, each its own rows) and on a 1-rank group in the test process.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import adalora_fast as af
from adalora_fast.integrations import fsdp
from tests.helpers import batches, launch_ranks
from tests.integration.test_fsdp_helpers import (
    GLOBAL_BATCH,
    KINDS,
    LAUNCH_TIMEOUT_S,
    NEEDS_GLOO,
    SEQ,
    SHORT,
    WORLD,
    assert_equals_one_process,
    assert_ranks_alike,
    make_model,
    one_rank_group,
    rows_of,
    run_rank,
    train,
)

pytestmark = NEEDS_GLOO
SEED = 60  # rank r draws its adapters after manual_seed(SEED + r); rank 0's are broadcast
HELD = [True, False] * 3  # the init_r = 6 positions a resized layer holds


class HookFailed(Exception):
    pass


def _fail(_param: torch.Tensor) -> None:
    raise HookFailed("a gradient hook failed")


def _failing_backward(model: af.AdaLoraModel, rows: slice) -> bool:
    """A backward that raises in layer 0, whose adapter gradients come last: the later layers' gradients
    have queued the end-of-backward reduction by then, which never runs. True if it raised."""
    hook = model.model.model.layers[0].self_attn.q_proj.lora_A.register_post_accumulate_grad_hook(_fail)
    x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][rows]
    try:
        model(input_ids=x, labels=x).loss.backward()
    except HookFailed:
        return True
    finally:
        hook.remove()
        model.zero_grad()
    return False


def _resized_grads(model: af.AdaLoraModel, rows: slice) -> dict[str, torch.Tensor]:
    """Every layer resized to rank 3 (new parameter objects) holding values of one seed, alike on every
    rank (as a checkpoint of other ranks loads), then one backward on ``rows``: the new factors' grads."""
    g = torch.Generator().manual_seed(7)
    for _, layer in model.adapted_layers:
        layer.resize(sum(HELD), HELD)
        with torch.no_grad():
            for kind in KINDS:
                p = getattr(layer, kind)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = batches(1, batch=GLOBAL_BATCH, seq=SEQ)[0][rows]
    model(input_ids=x, labels=x).loss.backward()
    return {f"{n}.{k}": getattr(layer, k).grad.clone() for n, layer in model.adapted_layers for k in KINDS}


def _resync_run(model: af.AdaLoraModel, rows: slice, ckpt: Path, is_main: bool) -> dict:
    """A backward that raises, then training; a checkpoint loaded back in place (``load_adapter``) and
    training on; the factors replaced (resize) and a backward. One process runs it too."""
    out: dict = {"raised": _failing_backward(model, rows)}
    out["after_raise"] = train(model, rows, range(3))
    model.save_pretrained(ckpt, is_main_process=is_main)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written it
    train(model, rows, range(3, 4))  # the weights move away from the checkpoint
    model.load_adapter(ckpt)
    out["loaded"] = train(model, rows, range(3, 5))
    out["resized"] = _resized_grads(model, rows)
    return out


# ---- the ranks (run as a script) ----------------------------------------------------------------------


def _rank_resync(rank: int, out: Path) -> None:
    model = af.fully_shard(make_model(seed=SEED + rank))
    results = _resync_run(model, rows_of(rank), out / "resync_ckpt", is_main=rank == 0)
    torch.save(results, out / f"resync_rank{rank}.pt")


# ---- tests --------------------------------------------------------------------------------------------


def test_the_sync_survives_a_raised_backward_load_adapter_and_resized_layers(tmp_path):
    launch_ranks(__file__, "resync", tmp_path, WORLD, LAUNCH_TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"resync_rank{r}.pt") for r in range(WORLD)]
    single = _resync_run(make_model(seed=SEED), rows_of(None), tmp_path / "single_ckpt", is_main=True)
    assert all(r["raised"] for r in ranks) and single["raised"]
    for run in ("after_raise", "loaded"):
        assert_ranks_alike(ranks, run)
        assert_equals_one_process(ranks[0][run], single[run], run)
    # The replaced factors' gradients: averaged (alike on the ranks), the whole batch's gradient.
    for name, grad in single["resized"].items():
        assert torch.equal(ranks[1]["resized"][name], ranks[0]["resized"][name]), name
        torch.testing.assert_close(ranks[0]["resized"][name], grad, rtol=1e-5, atol=1e-7)
    assert any(bool(g.abs().sum() > 0) for g in single["resized"].values())


# ---- one rank, in the test process --------------------------------------------------------------------


def _backward(model: af.AdaLoraModel) -> None:
    x = batches(1, batch=2, seq=SEQ)[0]
    model(input_ids=x, labels=x).loss.backward()


def test_a_backward_that_raised_leaves_the_next_one_synchronised(tmp_path):
    with one_rank_group(tmp_path):
        model = af.fully_shard(make_model(seed=0, schedule=SHORT))
        sync = model._adalora_replicated
        assert _failing_backward(model, rows_of(None))
        assert sync.reductions == 0  # the reduction queued by the later layers never ran
        _backward(model)
        assert sync.reductions == 1


def test_refresh_walks_the_layers_only_after_a_layer_replaced_its_factors(tmp_path, monkeypatch):
    with one_rank_group(tmp_path):
        model = af.fully_shard(make_model(seed=0, schedule=SHORT))
        sync = model._adalora_replicated
        walks = []
        walk = fsdp.replicated_parameters
        monkeypatch.setattr(fsdp, "replicated_parameters", lambda m: walks.append(m) or walk(m))
        _backward(model)
        _backward(model)
        assert walks == [] and sync.reductions == 2
        layer = model.adapted_layers[3][1]
        old = layer.lora_A
        layer.resize(sum(HELD), HELD)
        model.zero_grad()
        _backward(model)
        assert len(walks) == 1 and sync.reductions == 3
        assert any(p is layer.lora_A for p in sync.params) and not any(p is old for p in sync.params)
        assert layer.lora_A.grad is not None
        _backward(model)
        assert len(walks) == 1


def test_the_sync_flag_is_read_under_its_older_name_too(tmp_path, monkeypatch):
    with one_rank_group(tmp_path):
        model = af.fully_shard(make_model(seed=0, schedule=SHORT))
        sync = model._adalora_replicated
        assert sync.sync_enabled()
        model.set_requires_gradient_sync(False)
        assert not sync.sync_enabled()
        model.set_requires_gradient_sync(True)
        for flag in (False, True):  # torch before reduce_grads called it reduce_scatter_grads
            group = SimpleNamespace(reduce_scatter_grads=flag)
            monkeypatch.setattr(fsdp, "_param_groups", lambda _m, group=group: [group])
            assert sync.sync_enabled() is flag


if __name__ == "__main__":
    run_rank({"resync": _rank_resync})
