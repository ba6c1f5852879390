"""Output locations: checked writable before any work starts, and owned by one process at a time.

- `writable_dir(path, what)`: make `path` a directory this process can write into (creating it and
  its parents) or raise an AtlasError naming `what` (a config key or a flag) and the fix. A file
  where the directory should be, a parent that is a file, a read-only or immutable place: all are
  found here, not at the first save after hours of training.
- `atomic_write_bytes(path, data)` / `atomic_write_text(path, text)`: write to a temporary name beside
  `path`, then rename, so a reader (or a crash) never sees half a file.
- `DirLock(path, what)`: an OS file lock (`fcntl.flock`) on `<path>/.atlas.lock`, held for the life
  of a run or a data preparation and released by the OS when the process ends, crash included. A
  second owner is refused with one line naming the PID that holds the lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

from atlas_jax.errors import AtlasError

LOCK_NAME = ".atlas.lock"


class PathError(AtlasError):
    pass


def cache_dir() -> Path:
    """Atlas's cache: $ATLAS_CACHE, default ~/.cache/atlas (corpora/, jax-compile/)."""
    return Path(os.environ.get("ATLAS_CACHE") or "~/.cache/atlas").expanduser()


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def writable_dir(path: str | Path, what: str) -> Path:
    """`path` as an existing directory that accepts new files, or a PathError naming `what`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{what}={path}: that is a file, not a directory; name a directory (or move the file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise PathError(f"{what}={path}: cannot create it, {parent} is a file; name another directory") from None
    except OSError as e:
        raise PathError(f"{what}={path}: cannot create the directory ({_why(e)}); name a writable place") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".atlas-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PathError(f"{what}={path}: the directory is not writable ({_why(e)}); fix its permissions "
                        f"or name another directory") from None
    return path


def writable_file(path: str | Path, what: str) -> Path:
    """`path` as a file that can be written (its directory writable, not itself a directory)."""
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{what}={path}: that is a directory; name a file to write")
    writable_dir(path.parent, f"{what} (its directory)")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


class DirLock:
    """Exclusive ownership of a directory for this process (see the module docstring)."""

    def __init__(self, path: str | Path, what: str, hint: str = "wait for it to finish or stop it"):
        self.path, self.what, self.hint = Path(path), what, hint
        self.fd: int | None = None

    def __enter__(self) -> "DirLock":
        lock = self.path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PathError(f"{self.what}={self.path}: cannot create {LOCK_NAME} ({_why(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise PathError(f"{self.what}={self.path}: cannot lock it ({_why(e)})") from None
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise PathError(f"{self.what}={self.path} is in use by PID {holder} (lock {lock}); "
                            f"{self.hint}, or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock; the file stays (removing it would race)
            self.fd = None


def check_utf8(text: str, where: str) -> str:
    """Text from argv or a terminal holds undecodable bytes as surrogates (surrogateescape): refuse them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PathError(f"{where}: the prompt is not valid UTF-8 (undecodable byte at character {e.start}); "
                        f"give UTF-8 text") from None
    return text


def read_stdin_utf8() -> str:
    """All of stdin as UTF-8 text, or one line naming the first invalid byte and its offset."""
    import sys

    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PathError(f"stdin: the prompt is not UTF-8 (invalid byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from None
