"""Data files on disk: why a path cannot be read (a folder, a symlink loop, a dangling link, no permission), and their md5.

``Path.is_file()`` answers False for all of these alike, which used to surface as "not found".
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path


def unreadable_reason(path: Path) -> str | None:
    """What stops ``path`` from being read as one data file ("is a directory", ...); None when it can be."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        return _stat_failure(path, error)
    if stat.S_ISDIR(mode):
        return "is a directory, not a data file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, socket or device)"
    try:
        with path.open("rb"):
            return None
    except PermissionError:
        return f"permission denied: uid {os.geteuid()} cannot read it (fix its permissions, e.g. chmod a+r)"
    except OSError as error:
        return f"cannot be opened ({error.strerror})"


def _stat_failure(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "is a symlink loop (following its links leads back to itself)"
    if error.errno == errno.EACCES:
        return f"permission denied on a folder above it (uid {os.geteuid()} cannot look inside)"
    if path.is_symlink():
        return f"is a dangling symlink: it points to {os.readlink(path)}, which does not exist"
    if error.errno == errno.ENOTDIR:
        return "not found (a part of the path above it is a file, not a folder)"
    if error.errno == errno.ENOENT:
        return "not found"
    return f"cannot be read ({error.strerror})"


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
