"""checkpoint/transaction.py: a checkpoint folder changes as one unit. A save that fails (a full disk)
or is killed at any moment leaves a folder that loads as exactly the old or exactly the new checkpoint;
a save killed after its commit point is finished by the next reader; the next save deletes the strays
of saves that never committed, and nothing that is not ours.

The kill test runs this file as a script in a fresh process (``python test_transaction.py kill DIR
KILLS``): it forks a child that saves two checkpoints in turn, forever, kills it with SIGKILL at a
random moment, loads the folder and records which checkpoint it found; then again.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import adalora_fast as af
from adalora_fast.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, transaction
from tests.helpers import REPO_ROOT, batches, checkpoint_model, tiny_llama, train_loop, trainable_params

FILES = sorted([CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, "README.md"])
KILLS = 120


def _trained(steps: int, seed: int = 0) -> af.AdaLoraModel:
    """A checkpoint model trained ``steps`` steps (past a mask step when ``steps`` > 4)."""
    torch.manual_seed(seed)
    model = checkpoint_model(tiny_llama(2, hidden=64, intermediate=96))
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    train_loop(model, opt, range(steps), batches(steps))
    return model


def _snapshot(model: af.AdaLoraModel) -> dict:
    """What a checkpoint must give back: the rank pattern, every adapter tensor, the allocator state."""
    state = model.rank_allocator.state_dict() if model.rank_allocator is not None else None
    return {
        "pattern": model.rank_pattern,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
        "scores": None if state is None else {k: v.clone() for k, v in state["scores"].items()},
        "last_step": None if state is None else state["last_step"],
    }


def _loaded(folder: Path, trainable: bool) -> dict:
    base = tiny_llama(2, hidden=64, intermediate=96)
    return _snapshot(af.AdaLoraModel.from_pretrained(base, folder, is_trainable=trainable))


def _same(a: dict, b: dict, with_state: bool) -> bool:
    if a["pattern"] != b["pattern"] or a["weights"].keys() != b["weights"].keys():
        return False
    if not all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"]):
        return False
    if not with_state:
        return True
    return a["last_step"] == b["last_step"] and all(
        torch.equal(a["scores"][k], b["scores"][k]) for k in a["scores"]
    )


def _references(model: af.AdaLoraModel, folder: Path) -> dict[bool, dict]:
    """What loading a clean save of ``model`` gives, for inference (False) and for training (True)."""
    model.save_pretrained(folder)
    return {trainable: _loaded(folder, trainable) for trainable in (False, True)}


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---- a failing save leaves the old checkpoint --------------------------------------------------------


@pytest.mark.parametrize("where", ["weights", "training state", "commit record"])
def test_a_full_disk_leaves_the_old_checkpoint(tmp_path, monkeypatch, where):
    old = _trained(6)
    old.save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in FILES}
    new = _trained(6, seed=1)
    new.rank_allocator.last_step = 7  # also a different training state

    def full(*args, **kwargs):
        target = next((a for a in args if isinstance(a, (str, Path))), None)
        if target is not None:
            Path(target).write_bytes(b"partial")  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    import adalora_fast.checkpoint.peft_format as peft_format
    import adalora_fast.checkpoint.training_state as training_state

    if where == "weights":
        monkeypatch.setattr(peft_format, "save_file", full)
    elif where == "training state":
        monkeypatch.setattr(training_state, "save_file", full)
    else:
        real = Path.write_text

        def commit_fails(self, *args, **kwargs):
            if self.name.startswith(transaction.COMMIT_NAME):
                full(self)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", commit_fails)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert _names(tmp_path) == FILES  # no temporaries, no commit record
    assert {n: (tmp_path / n).read_bytes() for n in FILES} == before
    assert _same(_loaded(tmp_path, True), _snapshot(old), with_state=True)


def test_a_save_killed_after_its_commit_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    old = _trained(6)
    old.save_pretrained(tmp_path)
    new = _trained(8, seed=1)
    assert new.rank_pattern != old.rank_pattern

    def killed(path, record):  # the process dies right after the commit point
        raise KeyboardInterrupt

    monkeypatch.setattr(transaction, "_apply", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / transaction.COMMIT_NAME).is_file()
    expected = _references(new, tmp_path.parent / "clean")
    assert _same(_loaded(tmp_path, False), expected[False], with_state=False)
    assert _names(tmp_path) == FILES
    assert _same(_loaded(tmp_path, True), expected[True], with_state=True)


def test_the_next_save_removes_strays_and_nothing_else(tmp_path):
    model = _trained(2)
    tmp_path.joinpath(f".{WEIGHTS_NAME}.0123abcd{transaction.TMP_SUFFIX}").write_bytes(b"x" * 100)
    tmp_path.joinpath(f".{CONFIG_NAME}.k3j2h1.tmp").write_text("{")  # an older version's temporary
    theirs = [".other_tool.tmp", "notes.txt", "optimizer.pt"]
    for name in theirs:
        tmp_path.joinpath(name).write_text("not ours")
    model.save_pretrained(tmp_path)
    assert _names(tmp_path) == sorted(FILES + theirs)
    assert all(tmp_path.joinpath(n).read_text() == "not ours" for n in theirs)
    # An inference model's save removes the training state in the same unit.
    inference = af.AdaLoraModel.from_pretrained(tiny_llama(2, hidden=64, intermediate=96), tmp_path)
    inference.save_pretrained(tmp_path)
    assert STATE_NAME not in _names(tmp_path)


def test_a_foreign_commit_record_is_refused_naming_the_file(tmp_path):
    _trained(2).save_pretrained(tmp_path)
    (tmp_path / transaction.COMMIT_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"\.adalora_commit\.json: not a commit record of adalora_fast"):
        af.AdaLoraModel.from_pretrained(tiny_llama(2, hidden=64, intermediate=96), tmp_path)


# ---- killed at random moments ----------------------------------------------------------------------


def _kill_harness(folder: Path, kills: int) -> None:
    """Fork a child saving the checkpoint the folder does not hold, then both in turn, for ever; SIGKILL it
    at a random moment within about two saves; load the folder (trainable and for inference) and record
    which checkpoint it holds. ``kills`` times."""
    torch.set_num_threads(1)  # no thread pool in the parent: forking stays safe
    models = {"A": _trained(6), "B": _trained(10, seed=1)}
    refs = {k: _references(m, folder.parent / f"clean_{k}") for k, m in models.items()}
    assert refs["A"][False]["pattern"] != refs["B"][False]["pattern"]
    models["A"].save_pretrained(folder)
    other = {"A": "B", "B": "A"}

    def child(first: str, forever: bool) -> None:  # in the forked child: save, never return
        try:
            k = first
            while True:
                models[k].save_pretrained(folder)
                if not forever:
                    break
                k = other[k]
        finally:
            os._exit(0)

    # One save in a fresh child, fork included (page faults make it slower than in the parent).
    start = time.perf_counter()
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            child("A", forever=False)
        os.waitpid(pid, 0)
    save_s = (time.perf_counter() - start) / 4
    rng = random.Random(0)
    found, strays, current = [], 0, "A"
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # saves the other checkpoint first, then both in turn
            child(other[current], forever=True)
        time.sleep(rng.uniform(0.0, 2.5 * save_s))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        strays += len(transaction.stray_temporaries(folder))
        seen = []
        for trainable in (False, True):
            got = _loaded(folder, trainable)
            seen.append(next((k for k in "AB" if _same(got, refs[k][trainable], with_state=trainable)), None))
        found.append(seen)
        current = seen[0] or current
    models["A"].save_pretrained(folder)
    left = [p.name for p in transaction.stray_temporaries(folder)]
    result = {"found": found, "strays_seen": strays, "left_after_save": left, "save_ms": save_s * 1e3}
    (folder.parent / "kills.json").write_text(json.dumps(result))


def test_killed_saves_leave_the_old_or_the_new_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, __file__, "kill", str(folder), str(KILLS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "kills.json").read_text())
    found = result["found"]
    assert len(found) == KILLS
    # Every kill left exactly A or exactly B, the same checkpoint for both loads.
    bad = [i for i, (inference, trainable) in enumerate(found) if inference is None or inference != trainable]
    assert not bad, [found[i] for i in bad]
    outcomes = {f[0] for f in found}
    assert outcomes == {"A", "B"}, outcomes
    assert result["strays_seen"] > 0  # kills landed mid-save, leaving temporaries ...
    assert result["left_after_save"] == []  # ... which the next save removed


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        _kill_harness(Path(sys.argv[2]), int(sys.argv[3]))
