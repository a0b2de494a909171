"""A checkpoint directory written as one unit: a save leaves the old checkpoint or the new one, never a
mix, whenever it is killed and however full the disk is.

Every file of a save is first written (and flushed to disk) as a temporary beside its final name. The
save commits by writing ``.adalora_commit.json`` atomically: it lists the renames (temporary -> final)
and the files to delete. Then the renames and deletions run, and the commit file is removed. Before
the commit file exists, the directory still holds the complete old checkpoint (the temporaries are
strays); once it exists, the save is decided, and any reader or the next save finishes it
(:func:`finish_interrupted_save`: the renames are idempotent). Strays of saves that never committed
are deleted by the next save. Files that are not ours are never touched.

A commit record names only our files (those declared with :func:`own`) and their temporaries in the
folder itself: any other record (a crafted one could rename or delete files anywhere) is refused before
anything changes. Saves and finishers of one folder take turns on the lock file ``.adalora_lock``
(deleted again by its holder), so concurrent saves never touch each other's temporaries.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from types import TracebackType

try:  # POSIX
    import fcntl
except ImportError:
    fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

COMMIT_NAME = ".adalora_commit.json"
LOCK_NAME = ".adalora_lock"
TMP_SUFFIX = ".adalora-tmp"
_OURS: set[str] = set()
_HELD: set[int] = set()  # the lock files this process holds open


def own(names: Iterable[str]) -> None:
    """Declare the names of the files saves write: the only files a commit record may rename onto or
    delete. (``checkpoint/__init__`` declares ``CHECKPOINT_FILES``; this module cannot import it: the
    modules that name the files import this one.)"""
    _OURS.update(names)


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


def _not_ours(commit: Path, what: str) -> ValueError:
    return ValueError(f"{commit}: not a commit record of adalora_fast ({what})")


def _is_temporary(final: str, tmp: str) -> bool:
    """``tmp`` is exactly ``.{final}.<hex>.adalora-tmp``: a name in the folder itself, never a path."""
    if any(bad in tmp for bad in ("/", "\\", "..")):
        return False
    return re.fullmatch(re.escape(f".{final}.") + "[0-9a-f]+" + re.escape(TMP_SUFFIX), tmp) is not None


def _check_record(commit: Path, record: object) -> dict:
    """``record`` if it renames only temporaries of ours onto our files and deletes only our files."""
    if not isinstance(record, dict) or set(record) != {"rename", "remove"}:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise _not_ours(commit, f"keys {keys!r}, expected ['remove', 'rename']")
    rename, remove = record["rename"], record["remove"]
    if not isinstance(rename, dict):
        raise _not_ours(commit, f"'rename': {rename!r} is not an object")
    if not isinstance(remove, list):
        raise _not_ours(commit, f"'remove': {remove!r} is not a list")
    for name in [*rename, *remove]:
        if not isinstance(name, str) or name not in _OURS:
            raise _not_ours(commit, f"{name!r} is not a checkpoint file of ours")
    for final, tmp in rename.items():
        if not isinstance(tmp, str) or not _is_temporary(final, tmp):
            raise _not_ours(commit, f"{tmp!r} is not a temporary of {final!r}")
        if final in remove:
            raise _not_ours(commit, f"{final!r} is both renamed and removed")
    return record


def _read_commit(path: Path) -> dict | None:
    commit = path / COMMIT_NAME
    if not commit.is_file():
        return None
    try:
        text = commit.read_text()
    except FileNotFoundError:  # finished meanwhile by the save (or another reader)
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise _not_ours(commit, str(e)) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:  # written atomically: not ours
        raise _not_ours(commit, str(e)) from None
    return _check_record(commit, record)


def _lock_fd(fd: int) -> None:
    """Block until this process holds the lock of the open file ``fd``."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while True:  # msvcrt: LK_LOCK gives up after 10 s of retries; keep waiting
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
            return
        except OSError as e:
            if e.errno != errno.EDEADLOCK:
                raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _drop_inherited_locks() -> None:
    """In a forked child: close the parent's lock files (a shared flock is held while any process keeps
    it open, so a child saving into the folder would wait for itself)."""
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _acquire(lock: Path) -> int:
    """The open lock file ``lock``, locked by this process. The holder deletes the file as it lets go
    (the folder keeps only the checkpoint's files), so a waiter that then gets the lock of the deleted
    file tries again with the new one."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):
            _HELD.add(fd)
            return fd
        os.close(fd)


def _release(lock: Path, fd: int) -> None:
    _HELD.discard(fd)
    if fcntl is not None:  # deleted while still locked: a waiter then retries with a new file
        with suppress(OSError):
            lock.unlink()
    else:  # Windows cannot delete an open file: there the lock file stays
        with suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    os.close(fd)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the lock of folder ``path``: its saves and finishers take turns (fcntl.flock, else
    msvcrt.locking). Without either (WASI, say) there is no lock: concurrent saves into one folder are
    then the caller's to avoid."""
    if fcntl is None and msvcrt is None:
        yield
        return
    lock, owner = path / LOCK_NAME, os.getpid()
    fd = _acquire(lock)
    try:
        yield
    finally:
        if os.getpid() == owner:  # a forked child leaving the block holds nothing (closed at the fork)
            _release(lock, fd)


def _apply(path: Path, record: dict, missing_ok: bool = False) -> None:
    for final, tmp in record["rename"].items():
        try:
            os.replace(path / tmp, path / final)
        except FileNotFoundError:
            if not missing_ok:
                raise RuntimeError(
                    f"{path / tmp}: the staged temporary of {final} vanished before its rename"
                ) from None
            # else renamed already, by an earlier attempt that was killed
    for name in record["remove"]:
        (path / name).unlink(missing_ok=True)
    _fsync_dir(path)
    (path / COMMIT_NAME).unlink(missing_ok=True)
    _fsync_dir(path)


def _finish(path: Path) -> None:
    """:func:`finish_interrupted_save`, with the folder's lock held."""
    record = _read_commit(path)  # again: another process may have finished it before we got the lock
    if record is not None:
        _apply(path, record, missing_ok=True)


def finish_interrupted_save(path: Path) -> None:
    """Complete a save of ``path`` that was killed after it committed (a no-op otherwise)."""
    if _read_commit(path) is None:  # nothing to finish: no lock, so read-only folders load
        return
    try:
        with _locked(path):
            _finish(path)
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
            raise
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
        self._lock = ExitStack()

    def __enter__(self) -> DirectoryWrite:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock.enter_context(_locked(self.path))  # held to the end: no other save runs meanwhile
        try:
            _finish(self.path)
            for stray in stray_temporaries(self.path, self._owned):
                stray.unlink(missing_ok=True)
        except BaseException:
            self._lock.close()
            raise
        return self

    @staticmethod
    def _check_ours(name: str) -> None:
        if name not in _OURS:  # its commit record would be refused: the save could never be finished
            raise ValueError(f"DirectoryWrite: {name!r} is not a checkpoint file (declare it with own())")

    def stage(self, name: str, write: Callable[[str], None]) -> Path:
        """``write(tmp)`` the new content of ``path/name`` to a temporary (flushed to disk)."""
        if self._done:
            raise RuntimeError("DirectoryWrite: already committed")
        self._check_ours(name)
        tmp = self.path / f".{name}.{self._token}{TMP_SUFFIX}"
        self._staged[name] = tmp
        write(str(tmp))
        _fsync_file(tmp)
        self._removed.discard(name)
        return tmp

    def remove(self, name: str) -> None:
        """Delete ``path/name`` (if present) at the commit."""
        self._check_ours(name)
        if name not in self._staged:
            self._removed.add(name)

    def current(self, name: str) -> Path:
        """Where ``name``'s content is now: its staged temporary, else the file in the directory."""
        return self._staged.get(name, self.path / name)

    def exists(self, name: str) -> bool:
        return name in self._staged or (name not in self._removed and (self.path / name).is_file())

    def commit(self) -> None:
        for final, staged in self._staged.items():  # before the commit point: the old checkpoint stays
            if not staged.is_file():
                raise RuntimeError(f"{staged}: the staged temporary of {final} vanished before the commit")
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
        try:
            if not self._done:
                for tmp in self._staged.values():
                    tmp.unlink(missing_ok=True)
        finally:
            self._lock.close()
