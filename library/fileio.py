"""Atomic file writes: every output goes to a temporary name and is renamed into place,
so a crash never leaves a half-written file behind; a full disk or a read-only folder is said
in one line naming the file and the free space (WriteFailed), with the partial file removed.

A process killed mid-write (the out-of-memory killer, kill -9) cannot remove its temporary file;
the names say which process made them (`.NAME.<host>~<pid>.XXXXXXXX.tmp.safetensors`), so the next
run removes those whose process is gone (`remove_stale_temporaries`).
"""
from __future__ import annotations

import errno
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

from library.errors import UserError

# errno values that mean "this disk or folder cannot take the file", not a bug
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
LOW_SPACE = 1 << 20  # bytes available at the moment of a failure below which the disk counts as full


class WriteFailed(UserError):
    """A file or folder could not be written because of its file system (full, read-only, not
    permitted). The message names the path, the reason and the space left."""


def _write_errors() -> tuple[type[BaseException], ...]:
    """What writers raise when the disk fails them: OSError (numpy, Pillow, open), RuntimeError
    (torch.save: "PytorchStreamWriter failed writing file"), SafetensorError (safetensors)."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


def _existing_folder(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _mount_point(folder: Path) -> Path:
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def write_failure(path: str | os.PathLike, error: BaseException) -> WriteFailed | None:
    """A WriteFailed for `path` when `error` (raised while writing it) comes from its file system:
    a disk errno, a folder not writable, or (for writers that hide the errno) next to no space left
    at the moment of the failure; None for any other error, which is then a bug to show as one."""
    folder = _existing_folder(Path(path).parent)
    code = getattr(error, "errno", None)
    if code is None:  # safetensors says "No space left on device (os error 28)" in its message
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    writable = os.access(folder, os.W_OK)
    if code in DISK_ERRNOS:
        reason = os.strerror(code)
    elif not writable:
        reason = "the folder is not writable"
    elif free is not None and free < LOW_SPACE:
        reason = "no space left on device"
    else:
        return None
    space = f"{human_bytes(free)} free on {_mount_point(folder)}" if free is not None else "free space unknown"
    return WriteFailed(f"cannot write {path}: {reason} ({space})")


@contextmanager
def failures_said(path: str | os.PathLike) -> Iterator[None]:
    """Turn a file-system failure while writing `path` into WriteFailed; other errors pass."""
    try:
        yield
    except WriteFailed:
        raise
    except _write_errors() as e:
        failure = write_failure(path, e)
        if failure is None:
            raise
        raise failure from e


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
    with failures_said(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = suffix if suffix is not None else "".join(path.suffixes[-1:])
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.{_owner()}.", suffix=".tmp" + suffix, dir=path.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with failures_said(path):  # judged while the partial file still takes its space
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
    with failures_said(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    try:
        with failures_said(path):
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
    write_text(path, json.dumps(data, indent=2))


def write_text(path: str | os.PathLike, text: str) -> None:
    """A text file (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
