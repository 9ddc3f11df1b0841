"""Checks on the paths a command will write, made before its expensive work."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

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
