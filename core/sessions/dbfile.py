"""The database file itself: the one-instance lock, the pre-open check, backups, setting aside.

Everything here uses only the standard library (``sqlite3``, ``fcntl``/``msvcrt``),
so ``SessionStore.open`` can decide what to do with a file (use it, upgrade it,
refuse it) before SQLAlchemy or Alembic load, and without changing the file.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Optional, Sequence

from core.sessions.records import StoreCorrupt, StoreError, StoreLocked

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm")
_WINDOWS_LOCK_OFFSET = 1 << 30  # msvcrt locks a byte range; lock one far past the pid text


def where(path: Optional[Path]) -> str:
    return str(path) if path is not None else "(in memory)"


def db_error(exc: BaseException, path: Optional[Path]) -> StoreError:
    """One sentence naming the database for a SQLite error (raw ``sqlite3`` or wrapped by SQLAlchemy)."""
    return known_error(exc, path) or StoreError(f"The sessions database {where(path)} failed: {error_text(exc)}.")


def error_text(exc: BaseException) -> str:
    """SQLite's own words, on one line, without SQLAlchemy's statement and links."""
    orig = getattr(exc, "orig", None) or exc
    return " ".join(str(orig).split()).rstrip(".")


def known_error(exc: BaseException, path: Optional[Path]) -> Optional[StoreError]:
    """The sentence for a known condition (damaged, locked, full, read-only, I/O, cannot open), else None."""
    kind = _kind(exc)
    db = where(path)
    if kind == "corrupt":
        return StoreCorrupt(corrupt_message(path), path=path or Path(db))
    sentences = {
        "locked": f"The sessions database {db} is locked by another program; close it and try again.",
        "full": f"The disk holding the sessions database {db} is full; free some space and try again.",
        "readonly": f"The sessions database {db} is read-only; check the permissions of the file and its folder.",
        "io": f"The sessions database {db} could not be read or written (disk I/O error).",
        "cantopen": f"The sessions database {db} cannot be opened; check that its folder exists and is writable.",
    }
    return StoreError(sentences[kind]) if kind in sentences else None


# SQLite's primary result codes (https://sqlite.org/rescode.html) and, for errors without one, its words.
_CODES = {5: "locked", 6: "locked", 8: "readonly", 10: "io", 11: "corrupt", 13: "full", 14: "cantopen", 26: "corrupt"}
_WORDS = {
    "database is locked": "locked",
    "database table is locked": "locked",
    "attempt to write a readonly database": "readonly",
    "disk i/o error": "io",
    "database disk image is malformed": "corrupt",
    "file is not a database": "corrupt",
    "database or disk is full": "full",
    "unable to open database file": "cantopen",
}


def _kind(exc: BaseException) -> Optional[str]:
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _CODES.get(code & 0xFF)
    lowered = error_text(exc).lower()
    return next((kind for words, kind in _WORDS.items() if words in lowered), None)


def corrupt_message(path: Optional[Path]) -> str:
    return (
        f"The sessions database {where(path)} is damaged or is not a SQLite database; "
        "Merge Studio can set it aside and start a new one."
    )


# ----------------------------------------------------------------------------- lock


class ProcessLock:
    """An exclusive advisory lock on ``<db>.lock`` holding this process's pid.

    ``fcntl.flock`` (POSIX) or ``msvcrt.locking`` (Windows); the lock goes with
    the process, so a killed process never leaves a stale lock behind.
    """

    def __init__(self, lock_path: Path, fd: int) -> None:
        self.path = lock_path
        self._fd: Optional[int] = fd

    @classmethod
    def acquire(cls, db_path: Path) -> "ProcessLock":
        lock_path = db_path.with_name(db_path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"The lock file {lock_path} of the sessions database cannot be created ({exc.strerror or exc})."
            ) from None
        try:
            _lock(fd)
        except OSError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"process {pid}" if pid is not None else "a process whose id is unknown"
            raise StoreLocked(
                f"The sessions database {db_path} is in use by another Merge Studio ({who}).", path=db_path, pid=pid
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the lock holds anyway; only the pid in the message of a second instance is lost
        return cls(lock_path, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # before unlocking: never wipe the next holder's pid
        except OSError:
            pass
        try:
            _unlock(fd)
        finally:
            os.close(fd)


def _lock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_pid(fd: int) -> Optional[int]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


# ----------------------------------------------------------------------------- inspection


def readonly_uri(path: Path) -> str:
    """A SQLite URI opening the (absolute) ``path`` read-only, whatever characters it holds."""
    return f"{path.absolute().as_uri()}?mode=ro"


def inspect(path: Path, known: Sequence[str], *, locked: bool) -> Optional[str]:
    """The schema revision of the database at ``path``; None for a missing, empty or table-less file.

    Reads only: checks the SQLite header, runs ``PRAGMA quick_check`` and reads
    ``alembic_version`` on a read-only connection. Raises StoreCorrupt for a
    file that is not a sound SQLite database (or not a sessions database),
    StoreError for a revision not in ``known`` (a newer Merge Studio's), and
    then, if this process holds the lock (``locked``: no other Merge Studio can
    be using them), removes the ``-wal``/``-shm`` files SQLite created for the check.
    """
    if path.is_dir():
        raise StoreError(f"The sessions database {path} is a folder, not a file.")
    try:
        if not path.exists() or path.stat().st_size == 0:
            return None
        with open(path, "rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"The sessions database {path} cannot be read ({exc.strerror or exc}).") from None
    if magic != SQLITE_MAGIC:
        raise StoreCorrupt(corrupt_message(path), path=path)
    existed = {suffix: Path(f"{path}{suffix}").exists() for suffix in SIDE_FILES}
    ok = False
    try:
        revision = _read_revision(path)
        if revision is not None and revision not in known:
            raise StoreError(
                f"The sessions database {path} was written by a newer Merge Studio (schema revision {revision}); "
                "update Merge Studio to open it."
            )
        ok = True
        return revision
    finally:
        if not ok and locked:
            _remove_created(path, existed)


def _read_revision(path: Path) -> Optional[str]:
    try:
        con = sqlite3.connect(readonly_uri(path), uri=True)
        try:
            check = con.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise StoreCorrupt(corrupt_message(path), path=path)
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return None
            if "alembic_version" not in tables:
                raise StoreCorrupt(
                    f"The file {path} is a SQLite database but not a Merge Studio sessions database; "
                    "Merge Studio can set it aside and start a new one.",
                    path=path,
                )
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise db_error(exc, path) from None
    if len(rows) != 1:
        raise StoreCorrupt(corrupt_message(path), path=path)
    return str(rows[0][0])


def _remove_created(path: Path, existed: dict[str, bool]) -> None:
    """Leave the folder as it was: drop the -wal (empty) and -shm files a read-only check created."""
    for suffix in SIDE_FILES:
        side = Path(f"{path}{suffix}")
        try:
            if not existed[suffix] and side.exists() and (suffix == "-shm" or side.stat().st_size == 0):
                side.unlink()
        except OSError:
            pass


# ----------------------------------------------------------------------------- backups


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def free_name(candidate: Path) -> Path:
    """``candidate``, or ``candidate-2``, ``-3``... if taken (two opens within one second)."""
    name, n = candidate, 1
    while any(Path(f"{name}{s}").exists() for s in ("", *SIDE_FILES)):
        n += 1
        name = candidate.with_name(f"{candidate.name}-{n}")
    return name


def backup(path: Path, revision: str) -> Path:
    """Copy the database with SQLite's backup API to ``<db>.bak-<revision>-YYYYmmdd-HHMMSS``.

    Written under a temporary name and renamed when complete, so a backup that
    exists is whole.
    """
    target = free_name(path.with_name(f"{path.name}.bak-{revision}-{stamp()}"))
    part = target.with_name(target.name + ".part")
    try:
        src = sqlite3.connect(readonly_uri(path), uri=True)
        try:
            dst = sqlite3.connect(part)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(part, target)
    except (sqlite3.Error, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StoreError(
            f"The sessions database {path} could not be backed up to {target} before its upgrade ({reason}); "
            "nothing was changed."
        ) from None
    return target


def set_aside(path: Path) -> Path:
    """Rename the database (and its -wal/-shm) to ``<db>.corrupt-YYYYmmdd-HHMMSS``; returns the new name."""
    if not path.exists():
        raise StoreError(f"There is no sessions database at {path} to set aside.")
    target = free_name(path.with_name(f"{path.name}.corrupt-{stamp()}"))
    moved: list[tuple[Path, Path]] = []
    try:
        for suffix in ("", *SIDE_FILES):  # the file and its WAL go together or not at all
            old, new = Path(f"{path}{suffix}"), Path(f"{target}{suffix}")
            if old.exists():
                os.replace(old, new)
                moved.append((old, new))
    except OSError as exc:
        for old, new in reversed(moved):
            try:
                os.replace(new, old)
            except OSError:
                pass
        raise StoreError(
            f"The sessions database {path} could not be renamed to {target} ({exc.strerror or exc})."
        ) from None
    return target
