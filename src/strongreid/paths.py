"""The paths a command writes: checks made before its expensive work, and atomic writes."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from strongreid.errors import StrongReIDError


def check_output_path(path: str | os.PathLike[str], flag: str, *, folder: bool = False,
                      make_parents: bool = True) -> Path:
    """`path` as a Path, or a StrongReIDError naming `flag` and `path` when it cannot be written.

    For commands to call before their expensive work. `folder`: `path` is a folder to write
    into (it may exist); otherwise a file, which must not be a folder. `make_parents`: the
    command creates missing parent folders (else the parent must exist). Whether a file can be
    created is tried for real (a probe file, removed at once) in the nearest folder that exists,
    so read-only file systems and /proc are caught even for root.
    """
    target = Path(path)
    say = f"{flag} {os.fspath(path)}"
    where = target if folder else target.parent
    existing = where
    try:
        if folder and target.exists() and not target.is_dir():
            raise StrongReIDError(f"{say} is a file, not a folder: give a folder")
        if not folder and target.is_dir():
            raise StrongReIDError(f"{say} is a folder: give the path of a file to write")
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StrongReIDError(f"{say}: {existing} is a file, so no folder can be made in it; "
                                  "give a path in a folder")
        if existing != where and not make_parents:
            raise StrongReIDError(f"{say}: the folder {where} does not exist; create it or give "
                                  "another path")
        fd, probe = tempfile.mkstemp(prefix=".strongreid-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        # /proc and the like answer "No such file or directory" for a folder that is there.
        why = ("it takes no new files" if exc.errno == errno.ENOENT and existing.is_dir()
               else exc.strerror or str(exc))
        raise StrongReIDError(f"{say}: cannot create files in {existing} ({why}); give a path "
                              "in a folder you can write to") from None
    return target


# -- atomic writes ------------------------------------------------------------------------------
# Each writes a temporary file `.NAME.tmp<pid>` beside the target and renames it over the target
# (os.replace), so a reader sees the earlier file or the new one whole, never a part; on any
# failure (an interrupt too) the temporary file is removed and the target left as it was.


def _temp_path(target: Path, suffix: str = "") -> Path:
    """The temporary name the atomic writes use for `target`: `.NAME.tmp<pid><suffix>`."""
    return target.with_name(f".{target.name}.tmp{os.getpid()}{suffix}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *,
                 durable: bool = True) -> Path:
    """Write `path` atomically: `write(f)` on a binary file object opened on a temporary file in
    the same folder, which then replaces `path`. Missing parent folders are created. `durable`:
    the data is fsync'ed before the rename (a crash cannot leave an empty file under the name);
    leave it off only for writes made many times in a loop. Returns `path` as a Path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> Path:
    """`text` to `path` in UTF-8, atomically (see `atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), durable=durable)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True,
                keep_suffix: bool = False) -> Iterator[Path]:
    """For writers that take a file name (ONNX export, faiss, PyAV...): yields the temporary
    Path to write; when the block ends normally it replaces `path` (fsync'ed first when
    `durable`), when it raises the temporary file is removed. Missing parent folders are
    created. `keep_suffix`: the temporary name ends in `path`'s suffix too, for writers that
    choose the format by it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target, target.suffix if keep_suffix else "")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
