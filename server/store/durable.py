"""All-or-nothing, durable writes into the adapter store.

A registration may write several files (a centroid computed from posted examples, the manifest's
record of the name). Either all of them land or none does, and once the admin API answers 200
they survive a crash (kill -9, power loss): each file is written to a temporary name in its own
folder, flushed and fsynced, then renamed over the target, and the folder is fsynced so the
rename itself is on disk. A file a transaction replaces is kept (as a hard link, which needs no
data space) until the whole transaction succeeded, so a failure later in it -- typically the
manifest, written last, hitting a full disk -- puts every earlier file back as it was.

Any `OSError` while writing (ENOSPC, EDQUOT, EIO, EROFS, EACCES) becomes `StoreWriteFailed`:
HTTP 507 (Insufficient Storage, RFC 4918), with the registry and the manifest exactly as before.
"""

from __future__ import annotations

import errno
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.errors import SwitchboardError


class StoreWriteFailed(SwitchboardError):
    status_code = 507
    error_type = "insufficient_storage"
    code = "store_write_failed"


def failed(e: OSError, what: str) -> StoreWriteFailed:
    """The client's error for a failed store write: what was being written and the errno's name
    (ENOSPC, EIO, ...), never a path outside the store or a traceback."""
    name = errno.errorcode.get(e.errno or 0, type(e).__name__)
    return StoreWriteFailed(f"could not write {what} to the adapter store ({name}: {e.strerror or e}); "
                            "nothing was changed")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # file systems that cannot fsync a folder
            raise
    finally:
        os.close(fd)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_temp(target: Path, data: bytes) -> Path:
    """`data` in a fresh temporary file beside `target`, fsynced; removed again if anything fails.
    Mode as a plain `open()` would give (not mkstemp's 0600), so other readers of the store can
    still read what the server writes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _umask_mode())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_file(target: Path, data: bytes) -> None:
    """Replace `target` with `data` atomically and durably (temp + fsync + rename + fsync folder)."""
    tmp = write_temp(target, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


@dataclass
class Transaction:
    """Files replaced together: `stage` writes each to a temp file (so a full disk shows up before
    anything is renamed), `commit` renames them in order; `rollback` undoes what `commit` did.
    Use as `with Transaction() as t: t.stage(...); t.commit(); <the manifest>`: leaving the block
    by an exception rolls back, leaving it normally drops the backups."""

    staged: list[tuple[Path, Path]] = field(default_factory=list)  # (temp, target)
    done: list[tuple[Path, Path | None]] = field(default_factory=list)  # (target, backup or None)

    def stage(self, target: Path, data: bytes) -> None:
        self.staged.append((write_temp(target, data), target))

    def commit(self) -> None:
        for tmp, target in self.staged:
            backup = None
            if target.exists():
                backup = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.bak")
                os.link(target, backup)  # a second name for the old file: no data space needed
            try:
                os.replace(tmp, target)
            except BaseException:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise
            self.done.append((target, backup))
        for folder in {target.parent for _, target in self.staged}:
            fsync_dir(folder)
        self.staged = [(tmp, t) for tmp, t in self.staged if tmp.exists()]

    def rollback(self) -> None:
        for target, backup in reversed(self.done):
            if backup is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(backup, target)  # a rename: works on a full disk
        for folder in {target.parent for target, _ in self.done}:
            try:
                fsync_dir(folder)
            except OSError:
                pass
        self.done = []
        self._drop_temps()

    def _drop_temps(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()
            return
        for _, backup in self.done:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self._drop_temps()
