"""checkpoint/transaction.py: a checkpoint folder changes as one unit. A save that fails (a full disk)
or is killed at any moment leaves a folder that loads as exactly the old or exactly the new checkpoint;
a save killed after its commit point is finished by the next reader; the next save deletes the strays
of saves that never committed, and nothing that is not ours. A commit record that names anything but
our files and their temporaries is refused before anything changes; saves into one folder (two
processes) take turns on its lock, and each leaves a whole checkpoint.

The kill test runs this file as a script in a fresh process (``python test_transaction.py kill DIR
KILLS``): it forks a child that saves two checkpoints in turn, forever, kills it with SIGKILL at a
random moment, loads the folder and records which checkpoint it found; then again.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import adalora_fast as af
from adalora_fast.checkpoint import CHECKPOINT_FILES, CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, transaction
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


# ---- a commit record names only our files -------------------------------------------------------------

HEX = "0123456789ab"


def _tmp(final: str) -> str:
    return f".{final}.{HEX}{transaction.TMP_SUFFIX}"


def _save_text(folder: Path, contents: dict[str, str | None]) -> None:
    """One save of plain text files (None: remove the file)."""
    with transaction.DirectoryWrite(folder, CHECKPOINT_FILES) as tx:
        for name, text in contents.items():
            if text is None:
                tx.remove(name)
            else:
                tx.stage(name, lambda tmp, text=text: Path(tmp).write_text(text))
        tx.commit()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


VICTIM = "victim.txt"  # beside the checkpoint folder: never to be touched
# (record, the bad entry the error names); "@" stands for the victim's absolute path.
CRAFTED = {
    "final outside": ({"rename": {f"../{VICTIM}": _tmp(CONFIG_NAME)}, "remove": []}, f"../{VICTIM}"),
    "final absolute": ({"rename": {"@": _tmp(CONFIG_NAME)}, "remove": []}, "@"),
    "final not ours": ({"rename": {"notes.txt": _tmp("notes.txt")}, "remove": []}, "notes.txt"),
    "final in a subfolder": ({"rename": {f"sub/{CONFIG_NAME}": _tmp(CONFIG_NAME)}, "remove": []}, "sub/"),
    "temporary outside": ({"rename": {CONFIG_NAME: f"../{VICTIM}"}, "remove": []}, f"../{VICTIM}"),
    "temporary absolute": ({"rename": {CONFIG_NAME: "@"}, "remove": []}, "@"),
    "temporary in a subfolder": ({"rename": {CONFIG_NAME: f"sub/{_tmp(CONFIG_NAME)}"}, "remove": []}, "sub/"),
    "temporary of another file": ({"rename": {CONFIG_NAME: _tmp(WEIGHTS_NAME)}, "remove": []}, WEIGHTS_NAME),
    "temporary not a temporary": ({"rename": {CONFIG_NAME: "notes.txt"}, "remove": []}, "notes.txt"),
    "temporary with a backslash": ({"rename": {CONFIG_NAME: _tmp("a\\b")}, "remove": []}, "a\\\\b"),
    "temporary with a dotdot": (
        {"rename": {CONFIG_NAME: f".{CONFIG_NAME}.{HEX}/../..{transaction.TMP_SUFFIX}"}, "remove": []},
        "/../",
    ),
    "temporary not hex": (
        {"rename": {CONFIG_NAME: f".{CONFIG_NAME}.xyz{transaction.TMP_SUFFIX}"}, "remove": []},
        "xyz",
    ),
    "removal outside": ({"rename": {}, "remove": [f"../{VICTIM}"]}, f"../{VICTIM}"),
    "removal absolute": ({"rename": {}, "remove": ["@"]}, "@"),
    "removal not ours": ({"rename": {}, "remove": ["notes.txt"]}, "notes.txt"),
    "removal with a backslash": ({"rename": {}, "remove": [f"..\\{VICTIM}"]}, VICTIM),
    "renamed and removed": (
        {"rename": {CONFIG_NAME: _tmp(CONFIG_NAME)}, "remove": [CONFIG_NAME]},
        CONFIG_NAME,
    ),
    "no removals": ({"rename": {CONFIG_NAME: _tmp(CONFIG_NAME)}}, "remove"),
    "no renames": ({"remove": [STATE_NAME]}, "rename"),
    "renames not a dict": ({"rename": [[CONFIG_NAME, _tmp(CONFIG_NAME)]], "remove": []}, "rename"),
    "removals not a list": ({"rename": {}, "remove": STATE_NAME}, STATE_NAME),
    "a temporary not a string": ({"rename": {CONFIG_NAME: 7}, "remove": []}, "7"),
    "a removal not a string": ({"rename": {}, "remove": [None]}, "None"),
    "an unknown key": ({"rename": {}, "remove": [], "delete": [f"../{VICTIM}"]}, "delete"),
}


def _crafted_folder(tmp_path: Path, record: dict) -> Path:
    """A saved checkpoint, a file of someone else's inside and one outside, temporaries for every name
    a record may point at, and the record ("@": the outside file's absolute path)."""
    folder = tmp_path / "ckpt"
    _save_text(folder, {CONFIG_NAME: "old config", WEIGHTS_NAME: "old weights", STATE_NAME: "old state"})
    (folder / "notes.txt").write_text("not ours")
    (tmp_path / VICTIM).write_text("not ours either")
    (folder / "sub").mkdir()
    for tmp in [*(_tmp(name) for name in (*CHECKPOINT_FILES, "notes.txt")), f"sub/{_tmp(CONFIG_NAME)}"]:
        (folder / tmp).write_text("a temporary")
    text = json.dumps(record).replace('"@"', json.dumps(str(tmp_path / VICTIM)))
    (folder / transaction.COMMIT_NAME).write_text(text)
    return folder


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_commit_record_is_refused_before_anything_changes(tmp_path, case):
    record, entry = CRAFTED[case]
    folder = _crafted_folder(tmp_path, record)
    entry = entry.replace("@", str(tmp_path / VICTIM))
    before = _tree(tmp_path)
    with pytest.raises(ValueError) as err:
        transaction.finish_interrupted_save(folder)
    message = str(err.value)
    assert str(folder / transaction.COMMIT_NAME) in message and entry in message, message
    assert _tree(tmp_path) == before


def test_the_next_save_refuses_a_crafted_record_before_it_deletes_strays(tmp_path):
    folder = _crafted_folder(tmp_path, CRAFTED["removal outside"][0])
    (folder / _tmp(STATE_NAME)).write_text("a stray")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"not a commit record of adalora_fast"):
        _save_text(folder, {CONFIG_NAME: "new config"})
    assert _tree(tmp_path) == before


def test_a_valid_record_is_still_finished(tmp_path):
    folder = tmp_path / "ckpt"
    _save_text(folder, {CONFIG_NAME: "old", STATE_NAME: "old state"})
    (folder / _tmp(CONFIG_NAME)).write_text("new")
    record = {"rename": {CONFIG_NAME: _tmp(CONFIG_NAME)}, "remove": [STATE_NAME]}
    (folder / transaction.COMMIT_NAME).write_text(json.dumps(record))
    transaction.finish_interrupted_save(folder)
    assert _tree(folder) == {CONFIG_NAME: b"new"}


# ---- saves into one folder take turns ------------------------------------------------------------------

SAVES = {  # two saves that differ in every file, and in which files they leave
    "A": {name: f"A {name}" for name in CHECKPOINT_FILES},
    "B": {**{name: f"B {name}" for name in CHECKPOINT_FILES}, STATE_NAME: None},
}


def _expected(tag: str) -> dict[str, bytes]:
    return {name: text.encode() for name, text in SAVES[tag].items() if text is not None}


def _save_many(folder: Path, tag: str, times: int) -> None:
    try:
        for _ in range(times):
            _save_text(folder, SAVES[tag])
    except BaseException as e:
        (folder.parent / f"{tag}.error").write_text(f"{type(e).__name__}: {e}")
        raise


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_concurrent_saves_leave_one_whole_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    _save_text(folder, SAVES["A"])
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_save_many, args=(folder, tag, 150)) for tag in SAVES]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():  # hung: a deadlock
            p.kill()
    errors = {p.name: p.exitcode for p in procs if p.exitcode != 0}
    assert not errors, (errors, [e.read_text() for e in tmp_path.glob("*.error")])
    assert _tree(folder) in (_expected("A"), _expected("B")), _tree(folder)
    assert transaction.stray_temporaries(folder, CHECKPOINT_FILES) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_second_save_waits_for_the_first(tmp_path):
    folder = tmp_path / "ckpt"
    _save_text(folder, SAVES["A"])
    with transaction.DirectoryWrite(folder, CHECKPOINT_FILES) as tx:
        staged = tx.stage(CONFIG_NAME, lambda tmp: Path(tmp).write_text("first"))
        pid = os.fork()
        if pid == 0:  # the second save: it must not delete the first one's temporary as a stray
            code = 1
            try:
                _save_text(folder, SAVES["B"])
                code = 0
            finally:
                os._exit(code)
        time.sleep(0.5)
        assert staged.is_file()
        assert _tree(folder)[CONFIG_NAME] == f"A {CONFIG_NAME}".encode()  # the second save has not run
        tx.commit()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert _tree(folder) == _expected("B")  # it ran after the first


def test_the_lock_file_is_no_stray_and_goes_with_the_save(tmp_path):
    folder = tmp_path / "ckpt"
    with transaction.DirectoryWrite(folder, CHECKPOINT_FILES) as tx:
        lock = folder / transaction.LOCK_NAME
        assert lock.is_file()
        tx.stage(CONFIG_NAME, lambda tmp: Path(tmp).write_text("config"))
        assert lock not in transaction.stray_temporaries(folder, CHECKPOINT_FILES)
        tx.commit()
    assert _names(folder) == [CONFIG_NAME]
    lock.write_text("")  # left by a killed save: neither a stray nor in the way
    assert transaction.stray_temporaries(folder, CHECKPOINT_FILES) == []
    _save_text(folder, {CONFIG_NAME: "again"})
    assert _names(folder) == [CONFIG_NAME]


def test_a_temporary_gone_before_the_commit_fails_naming_it(tmp_path):
    folder = tmp_path / "ckpt"
    _save_text(folder, {CONFIG_NAME: "old config", WEIGHTS_NAME: "old weights"})
    with pytest.raises(RuntimeError, match=re.escape(f".{WEIGHTS_NAME}.")):
        with transaction.DirectoryWrite(folder, CHECKPOINT_FILES) as tx:
            tx.stage(CONFIG_NAME, lambda tmp: Path(tmp).write_text("new config"))
            tx.stage(WEIGHTS_NAME, lambda tmp: Path(tmp).write_text("new weights")).unlink()
            tx.commit()
    assert _tree(folder) == {CONFIG_NAME: b"old config", WEIGHTS_NAME: b"old weights"}


def test_a_temporary_gone_during_the_renames_fails_naming_it(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    real = os.replace

    def vanishing(src, dst):  # the weights' temporary goes between the check and its rename
        if Path(dst).name == WEIGHTS_NAME:
            Path(src).unlink()
        return real(src, dst)

    with pytest.raises(RuntimeError, match=re.escape(f".{WEIGHTS_NAME}.")):
        with transaction.DirectoryWrite(folder, CHECKPOINT_FILES) as tx:
            tx.stage(CONFIG_NAME, lambda tmp: Path(tmp).write_text("config"))
            tx.stage(WEIGHTS_NAME, lambda tmp: Path(tmp).write_text("weights"))
            monkeypatch.setattr(os, "replace", vanishing)
            tx.commit()


def _no_lock_file(monkeypatch) -> None:
    """The lock file cannot be created (a folder the user may only read)."""
    real = os.open

    def refused(path, *args, **kwargs):
        if Path(path).name == transaction.LOCK_NAME:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)


def test_a_read_only_folder_still_loads(tmp_path, monkeypatch):
    model = _trained(2)
    model.save_pretrained(tmp_path)
    expected = _snapshot(model)
    _no_lock_file(monkeypatch)
    assert _same(_loaded(tmp_path, True), expected, with_state=True)
    # ... but a save interrupted after its commit cannot be finished there
    (tmp_path / _tmp(CONFIG_NAME)).write_text("{}")
    record = {"rename": {CONFIG_NAME: _tmp(CONFIG_NAME)}, "remove": []}
    (tmp_path / transaction.COMMIT_NAME).write_text(json.dumps(record))
    with pytest.raises(PermissionError, match="finishing it needs write access"):
        _loaded(tmp_path, False)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_still_loads(tmp_path):
    model = _trained(2)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt").chmod(0o555)
    try:
        assert _same(_loaded(tmp_path / "ckpt", True), _snapshot(model), with_state=True)
    finally:
        (tmp_path / "ckpt").chmod(0o755)


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
