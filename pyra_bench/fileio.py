"""Files and folders made as a plain ``open()`` / ``mkdir`` would make them, but safely.

* :func:`atomic_write_bytes` / :func:`atomic_write_text`: the data goes to a temporary file in the target's
  folder, is fsynced and renamed over the target (``os.replace``), then the folder is fsynced so the rename
  itself survives a crash. A reader sees the old file or the new one, never half of it; any failure (a
  full disk, Ctrl-C) removes the temporary file.
* :func:`make_dir`: ``mkdir -p``; a path that exists but is not a folder, or cannot be made, is an
  :class:`~pyra_bench.errors.OutputPathError` naming it.
* :func:`make_temp_dir`: a fresh, uniquely named folder (like ``tempfile.mkdtemp``).
* :func:`check_writable_dir`: whether a folder can be made / written, without writing anything.
* :func:`writing`: around a write, turns the errors of a file system that refuses more data -- full
  (ENOSPC), over quota (EDQUOT), past the process's file-size limit (EFBIG, ``ulimit -f``) or read-only
  (EROFS) -- into one :class:`~pyra_bench.errors.WriteFailedError` naming the file, its folder and the limit
  (never retried: the same write fails the same way). :func:`temp_path`: a temporary name unique to this
  process (two processes writing the same file never share a temporary file).

Permissions. ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 (private) entries, so a renamed temp
file ends up unreadable to the rest of a lab. Here temporary files are created with ``os.open(...,
O_CREAT | O_EXCL, 0o666)`` and folders with ``os.mkdir(..., 0o777)``: the kernel applies the user's umask
(and a default ACL, where the folder has one) exactly as for ``open()`` / ``mkdir``, so a file ends as
``0o666 & ~umask`` (0644 under umask 022) and a folder as ``0o777 & ~umask`` (0755). Reading the umask
(``os.umask`` has to *set* it to read it, a race with other threads) is never needed. A replaced file
gets these permissions too, not the old file's.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError, WriteFailedError

#: OS errors of a file system that takes no more data: not transient, the run cannot go on.
WRITE_LIMIT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder (makes a rename or a new entry in it durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows, or a file system that does not allow it
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL on some network file systems
        pass
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Create ``path`` and its parents (``0o777 & ~umask``, like ``mkdir -p``); return it as a Path.

    ``what`` names the folder in the error (e.g. ``"results folder"``).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # exists, but is not a folder (mkdir's exist_ok only accepts folders)
        raise OutputPathError(f"{what} {path} exists but is not a folder; remove it or choose another path") from None
    except NotADirectoryError:
        raise OutputPathError(f"cannot make {what} {path}: a part of the path is a file, not a folder; "
                              "choose another path") from None
    except PermissionError as e:
        raise OutputPathError(f"cannot make {what} {path}: permission denied ({e.filename}); choose a folder "
                              "you can write") from None
    except OSError as e:
        raise OutputPathError(f"cannot make {what} {path}: {e.strerror or e}") from None
    return path


def check_writable_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Raise :class:`OutputPathError` unless ``path`` is a writable folder or could be made as one.

    Nothing is created: the nearest existing ancestor must be a writable, searchable folder.
    """
    path = Path(path)
    p = path
    while not p.exists():
        if p.is_symlink():  # a dangling link: mkdir would fail
            raise OutputPathError(f"{what} {path}: {p} is a broken symbolic link; fix or remove it")
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        if p == path:
            raise OutputPathError(f"{what} {path} exists but is not a folder; remove it or choose another path")
        raise OutputPathError(f"cannot make {what} {path}: {p} is a file, not a folder; choose another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: {'it' if p == path else p} is not writable by this user; "
                              "choose a folder you can write (or fix its permissions)")
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str = "tmp") -> Path:
    """A new folder ``<parent>/<prefix><random>`` with ``0o777 & ~umask`` (``mkdtemp`` would give 0700)."""
    for _ in range(100):
        p = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            os.mkdir(p, 0o777)
            return p
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary folder name {prefix}* in {parent}")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def write_limit(folder: Path, err: int) -> str:
    """The limit an ENOSPC / EDQUOT / EFBIG / EROFS write ran into, in words."""
    if err == errno.EFBIG:
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        except (ImportError, OSError, ValueError):
            soft = None
        if soft is not None and soft != getattr(resource, "RLIM_INFINITY", -1):
            return f"the file-size limit of this process ({_size(soft)}, `ulimit -f` {soft // 1024})"
        return "the largest file size of the file system"
    if err == errno.EROFS:
        return "the file system is read-only"
    if err == errno.EDQUOT:
        return "the disk quota of this user on that file system is used up (see `quota -s`)"
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    return f"the file system is full ({free})"


def write_failure(path: str | os.PathLike, e: OSError) -> WriteFailedError:
    """The one message for a write that a full / read-only / quota-bound / size-limited file system refused."""
    path = Path(path)
    return WriteFailedError(
        e.errno, f"cannot write {path.name} in {path.parent}: {e.strerror or e} -- {write_limit(path.parent, e.errno)}. "
        f"Nothing half-written is left and the last finished epoch is intact; make room (or raise the limit) and "
        f"run the same command again to resume", str(path))


def as_write_failure(e: BaseException, path: str | os.PathLike) -> WriteFailedError | None:
    """:func:`write_failure` of ``e`` at ``path`` when ``e`` is an error of :data:`WRITE_LIMIT_ERRNOS` (an
    ``OSError``, or a library's message carrying ``(os error N)``), else None."""
    code = os_errno(e)
    if code not in WRITE_LIMIT_ERRNOS:
        return None
    return write_failure(path, e if isinstance(e, OSError) else OSError(code, os.strerror(code)))


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write error of :data:`WRITE_LIMIT_ERRNOS` inside the block into :func:`write_failure`."""
    try:
        yield
    except WriteFailedError:
        raise
    except Exception as e:
        failure = as_write_failure(e, path)
        if failure is not None:
            raise failure from e
        raise


def os_errno(e: BaseException) -> int | None:
    """The OS error number of ``e``: an ``OSError``'s, or the ``(os error N)`` a Rust library (safetensors)
    puts in its message."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def file_xxh3(path: str | os.PathLike) -> str:
    """The xxh3-64 checksum (hex) of a file's bytes, read in 16 MiB chunks (GB/s: a fast integrity check)."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def temp_path(path: str | os.PathLike) -> Path:
    """``<folder>/.<name>.<pid>.<random>.tmp``: a temporary name for ``path`` unique to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _temp_file(folder: Path, name: str) -> tuple[int, Path]:
    for _ in range(100):
        tmp = temp_path(folder / name)
        try:
            return os.open(tmp, _FILE_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name .{name}.*.tmp in {folder}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); missing parent folders are made.

    The file ends with ``0o666 & ~umask``. On any failure the temporary file is removed and the old
    ``path`` (if any) is untouched.
    """
    path = Path(path)
    folder = make_dir(path.parent)
    with writing(path):
        fd, tmp = _temp_file(folder, path.name)
    try:
        with writing(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)
    return path


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically, like :func:`atomic_write_bytes`: a uniquely
    named temporary file (another process writing the same path never shares it), fsynced, renamed, the
    folder fsynced; the file ends with ``0o666 & ~umask`` (safetensors' own writer would leave 0600 through
    a private temporary file). On failure the temporary file is removed and the old ``path`` is untouched."""
    from safetensors.torch import save_file

    path = Path(path)
    folder = make_dir(path.parent)
    fd, tmp = _temp_file(folder, path.name)
    mode = os.fstat(fd).st_mode & 0o777  # what open() gives under the user's umask (and default ACL)
    os.close(fd)
    try:
        with writing(path):
            save_file(tensors, str(tmp), metadata=metadata)  # replaces the file, as 0600
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding))
