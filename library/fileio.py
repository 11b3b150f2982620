"""Atomic file writes: every output goes to a temporary name and is renamed into place,
so a crash never leaves a half-written file behind.

A process killed mid-write (the out-of-memory killer, kill -9) cannot remove its temporary file;
the names say which process made them (`.NAME.<host>~<pid>.XXXXXXXX.tmp.safetensors`), so the next
run removes those whose process is gone (`remove_stale_temporaries`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it replaces `path`.

    The temporary name keeps the real suffix (e.g. `.npz`, `.safetensors`) because some writers
    (numpy.savez) append one when it is missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes[-1:])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.{_owner()}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (a folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _owner() -> str:
    return f"{socket.gethostname()}~{os.getpid()}"


# `.NAME.<host>~<pid>.<mkstemp's 8 characters>.tmp[suffix]`
_TEMPORARY = re.compile(r"^\..*\.(?P<host>[^~/]+)~(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)?$")


def is_stale_temporary(name: str) -> bool:
    """A temporary file or folder of ours whose writer, a process of this machine, is gone."""
    match = _TEMPORARY.match(name)
    if match is None or match["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive, another user's; or no such pid at all
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left in `folder` (see the module docstring); returns them."""
    removed = []
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.startswith(".") and is_stale_temporary(entry.name)]
    except FileNotFoundError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing any folder there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def file_hash(path: str | os.PathLike, length: int = 12) -> str:
    """The first `length` hex digits of the file's sha256, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def write_json(path: str | os.PathLike, data: dict) -> None:
    """`data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
