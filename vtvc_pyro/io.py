"""Small file helpers: atomic writes and checksums, used wherever results or checkpoints are written.

Files get the permissions any other tool would give them (``0666`` less the umask), and a failed write
(disk full, read-only directory, a directory where a file should go) raises :class:`WriteError`, one
line naming the path, instead of a low-level traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_LOW_SPACE = 1 << 20  # bytes: below this a failed write is reported as a full disk


class WriteError(OSError, ValueError):
    """A file could not be written; the message names the path and says what to do."""


def permissions(base: int = 0o666) -> int:
    """``base`` less the process umask: the mode a new file (``0o666``) or directory (``0o777``) gets."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _free_bytes(path: Path) -> int | None:
    parent = next((p for p in path.parents if p.is_dir()), None)
    return shutil.disk_usage(parent).free if parent is not None else None


def _write_error(path: Path, err: OSError) -> WriteError:
    """The one-line error for a failed write of ``path``."""
    if isinstance(err, IsADirectoryError) or path.is_dir():
        return WriteError(f"cannot write {path}: it is a directory; give a file path")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if isinstance(err, NotADirectoryError) or blocking is not None:
        return WriteError(f"cannot write {path}: {blocking or path.parent} is a file, not a directory; "
                          "choose another path")
    if isinstance(err, PermissionError) or err.errno == errno.EROFS:
        return WriteError(f"cannot write {path}: permission denied or read-only file system; choose a "
                          "writable location")
    free = _free_bytes(path)
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < _LOW_SPACE):
        return WriteError(f"cannot write {path}: no space left on the device; free some space and run "
                          "the same command again")
    return WriteError(f"cannot write {path}: {err.strerror or err}")


def _is_write_failure(err: BaseException, path: Path) -> bool:
    """Whether ``err`` (raised while writing ``path``) is the file system refusing the write: an OSError
    other than a missing source file, or the stream error torch raises when the disk is full."""
    if isinstance(err, OSError):
        return not isinstance(err, FileNotFoundError) or not path.parent.is_dir()
    free = _free_bytes(path)
    return isinstance(err, RuntimeError) and free is not None and free < _LOW_SPACE


@contextlib.contextmanager
def _temporary(path: Path, suffix: str) -> Iterator[str]:
    """A temporary file next to ``path``, removed unless renamed over ``path`` by the caller. A refused
    write becomes a :class:`WriteError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
    except WriteError:
        raise
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        yield tmp
    except BaseException as err:
        failed = not isinstance(err, WriteError) and _is_write_failure(err, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if failed:
            cause = err if isinstance(err, OSError) else OSError(errno.ENOSPC, str(err))
            raise _write_error(path, cause) from err
        raise


def _replace(tmp: str, path: Path) -> None:
    """fsync ``tmp``, give it the umask's permissions (temporary files are created 0600, and some writers
    replace the file), and rename it over ``path``."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, permissions())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    A crash or an exception leaves the previous file (or no file) in place, never a partial one.
    """
    path = Path(path)
    with _temporary(path, ".tmp") as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
        _replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for writers that only take a filename (safetensors,
    matplotlib); it is renamed over ``path`` when the block exits without an exception."""
    path = Path(path)
    with _temporary(path, ".tmp" + path.suffix) as tmp:
        yield Path(tmp)
        _replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a truncated or malformed one raises a ValueError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: damaged JSON ({err})") from err


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes; of a directory (a Hugging Face checkpoint), of its files' relative
    paths and digests, in sorted order."""
    digest = hashlib.sha256()
    if Path(path).is_dir():
        for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file, chunk_size)}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
