"""A checkpoint directory written as one unit: a save leaves the old checkpoint or the new one, never a
mix, whenever it is killed and however full the disk is.

Every file of a save is first written (and flushed to disk) as a temporary beside its final name. The
save commits by writing ``.adalora_commit.json`` atomically: it lists the renames (temporary -> final)
and the files to delete. Then the renames and deletions run, and the commit file is removed. Before
the commit file exists, the directory still holds the complete old checkpoint (the temporaries are
strays); once it exists, the save is decided, and any reader or the next save finishes it
(:func:`finish_interrupted_save`: the renames are idempotent). Strays of saves that never committed
are deleted by the next save. Files that are not ours are never touched.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

COMMIT_NAME = ".adalora_commit.json"
TMP_SUFFIX = ".adalora-tmp"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_commit(path: Path) -> dict | None:
    commit = path / COMMIT_NAME
    if not commit.is_file():
        return None
    try:
        record = json.loads(commit.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # written atomically: not ours
        raise ValueError(f"{commit}: not a commit record of adalora_fast ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("rename"), dict):
        raise ValueError(f"{commit}: not a commit record of adalora_fast")
    return record


def _apply(path: Path, record: dict) -> None:
    for final, tmp in record["rename"].items():
        try:
            os.replace(path / tmp, path / final)
        except FileNotFoundError:  # renamed already (by an earlier attempt or another reader)
            pass
    for name in record.get("remove", []):
        (path / name).unlink(missing_ok=True)
    _fsync_dir(path)
    (path / COMMIT_NAME).unlink(missing_ok=True)
    _fsync_dir(path)


def finish_interrupted_save(path: Path) -> None:
    """Complete a save of ``path`` that was killed after it committed (a no-op otherwise)."""
    record = _read_commit(path)
    if record is None:
        return
    try:
        _apply(path, record)
    except PermissionError as e:
        raise PermissionError(
            f"{path}: a save was interrupted after it committed; finishing it needs write access ({e})"
        ) from None


def stray_temporaries(path: Path, owned: tuple[str, ...] = ()) -> list[Path]:
    """Temporaries of saves into ``path`` that never committed (and of ``owned`` files' per-file
    writes of earlier versions)."""
    found = set(path.glob(f".*{TMP_SUFFIX}"))
    for name in owned:
        found.update(path.glob(f".{name}.*.tmp"))
    return sorted(p for p in found if p.is_file())


class DirectoryWrite:
    """``with DirectoryWrite(path) as tx: tx.stage(name, write); ...; tx.commit()``: the files staged and
    removed change together at :meth:`commit`; leaving the block without committing (an error, a full
    disk) deletes the staged temporaries and leaves the directory as it was."""

    def __init__(self, path: Path, owned: tuple[str, ...] = ()) -> None:
        """``owned``: the names of the files saves write here (their temporaries of earlier versions,
        ``.<name>.*.tmp``, are strays too)."""
        self.path = path
        self._owned = owned
        self._token = secrets.token_hex(6)
        self._staged: dict[str, Path] = {}
        self._removed: set[str] = set()
        self._done = False

    def __enter__(self) -> DirectoryWrite:
        self.path.mkdir(parents=True, exist_ok=True)
        finish_interrupted_save(self.path)
        for stray in stray_temporaries(self.path, self._owned):
            stray.unlink(missing_ok=True)
        return self

    def stage(self, name: str, write: Callable[[str], None]) -> Path:
        """``write(tmp)`` the new content of ``path/name`` to a temporary (flushed to disk)."""
        if self._done:
            raise RuntimeError("DirectoryWrite: already committed")
        tmp = self.path / f".{name}.{self._token}{TMP_SUFFIX}"
        self._staged[name] = tmp
        write(str(tmp))
        _fsync_file(tmp)
        self._removed.discard(name)
        return tmp

    def remove(self, name: str) -> None:
        """Delete ``path/name`` (if present) at the commit."""
        if name not in self._staged:
            self._removed.add(name)

    def current(self, name: str) -> Path:
        """Where ``name``'s content is now: its staged temporary, else the file in the directory."""
        return self._staged.get(name, self.path / name)

    def exists(self, name: str) -> bool:
        return name in self._staged or (name not in self._removed and (self.path / name).is_file())

    def commit(self) -> None:
        record = {
            "rename": {final: tmp.name for final, tmp in self._staged.items()},
            "remove": sorted(self._removed),
        }
        commit = self.path / COMMIT_NAME
        tmp = self.path / f"{COMMIT_NAME}.{self._token}{TMP_SUFFIX}"
        try:
            tmp.write_text(json.dumps(record))
            _fsync_file(tmp)
            os.replace(tmp, commit)  # the commit point
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._done = True
        _fsync_dir(self.path)
        _apply(self.path, record)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            for tmp in self._staged.values():
                tmp.unlink(missing_ok=True)
