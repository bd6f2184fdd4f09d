"""Atomic writes: a file or a folder is either what it was before or complete, never half-written.

Every writer in modelkit goes through here. A file is written to ``.NAME.tmp-<pid>`` beside it,
synced, and renamed over ``NAME`` (``os.replace``); a folder is built as ``.NAME.tmp-<pid>`` beside
it, every file in it synced, then renamed into place (an existing folder is first moved aside to
``.NAME.old-<pid>`` and put back if the swap fails). The parent folder is synced after a rename,
so the new name survives a power cut. On any failure the temporary file or folder is removed and
an ``OSError`` (a full disk, a missing folder, no permission...) becomes one
:class:`~modelkit.errors.ModelkitError` naming the path and the OS reason.

Safetensors reports I/O failures as ``SafetensorError("... (os error 28)")``; :func:`os_reason`
reads the OS reason from that too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelkitError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["FileWriteError", "append_line", "atomic_file", "atomic_folder", "fsync_dir", "fsync_file", "os_reason",
           "temp_name", "write_bytes", "write_safetensors", "write_text"]

_OS_ERROR = re.compile(r"\(os error (\d+)\)")

ErrorFactory = Callable[[str], Exception]


class FileWriteError(ModelkitError, OSError):
    """A file or folder could not be written; the message names the path and the OS reason.
    Nothing was changed: the target is what it was before, and no temporary file remains."""


def os_reason(exc: BaseException) -> str | None:
    """The operating system's reason in ``exc`` ("No space left on device"), or None if it is no I/O error.

    Reads an ``OSError``'s ``strerror`` and the ``(os error N)`` that safetensors puts in its messages."""
    if isinstance(exc, OSError) and not isinstance(exc, ModelkitError):
        return exc.strerror or str(exc) or type(exc).__name__
    match = _OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if match:
        code = int(match.group(1))
        return os.strerror(code) if code in errno.errorcode else f"os error {code}"
    return None


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """The temporary name beside ``path`` this process uses: ``.NAME.<kind>-<pid>``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file or folder if it is there, ignoring errors (cleanup on a failure path)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _failure_as(error: ErrorFactory, what: str, path: Path) -> Iterator[None]:
    """Turn an I/O failure in the block into ``error("cannot write <what> <path>: <reason>")``."""
    try:
        yield
    except Exception as exc:
        reason = os_reason(exc)
        if reason is None and type(exc).__name__ == "SafetensorError":  # safetensors refused the tensors
            reason = str(exc)
        if reason is None:
            raise
        raise error(f"cannot write {what} {path}: {reason}") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, what: str = "file",
                error: ErrorFactory = FileWriteError) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends, sync it and rename it over ``path``.

    ``path`` is then either unchanged (any exception: the temporary file is removed; an I/O failure is
    raised as ``error("cannot write <what> <path>: <OS reason>")``) or the complete new file.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # replace the file, keep the link
    tmp = temp_name(target)
    with _failure_as(error, what, path):
        try:
            yield tmp
            fsync_file(tmp)
            _keep_mode(target, tmp)
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
        fsync_dir(target.parent.resolve())


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "file",
               error: ErrorFactory = FileWriteError) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`).

    A ``path`` that is a device or pipe (``/dev/stdout``) cannot be replaced and is written directly."""
    path = Path(path)
    if path.exists() and not path.is_file():
        with _failure_as(error, what, path):
            with open(path, "wb") as fh:
                fh.write(text.encode("utf-8"))
        return
    with atomic_file(path, what=what, error=error) as tmp:
        write_bytes(tmp, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Create (or truncate) ``path`` holding ``data``; not atomic by itself: for a temporary path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _write_fd(fd, data)
    finally:
        os.close(fd)


def append_line(path: str | os.PathLike[str], line: str, *, what: str = "file",
                error: ErrorFactory = FileWriteError) -> None:
    """Append ``line`` (which must end in a newline) to ``path`` in one ``write`` on an ``O_APPEND``
    descriptor. If the write fails (a full disk included), the file is cut back to its old length and
    ``error("cannot write <what> <path>: <reason>")`` is raised: the file never keeps half a line
    from a failed append (a process killed mid-write can still leave one; readers skip it)."""
    path = Path(path)
    with _failure_as(error, what, path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_fd(fd, line.encode("utf-8"))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def _write_fd(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (every byte modelkit writes itself goes through here)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _keep_mode(target: Path, tmp: Path) -> None:
    """Give ``tmp`` the permission bits of the file it replaces (if there is one)."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))


def write_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str], *,
                      metadata: Mapping[str, str] | None = None, what: str = "file",
                      error: ErrorFactory = FileWriteError) -> None:
    """Write ``tensors`` as a safetensors file at ``path`` atomically (see :func:`atomic_file`)."""
    from safetensors.torch import save_file

    with atomic_file(path, what=what, error=error) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)


def _sync_tree(folder: Path) -> None:
    """Sync every file under ``folder``, then every folder (deepest first)."""
    folders = []
    for root, _, names in os.walk(folder):
        folders.append(Path(root))
        for name in names:
            fsync_file(Path(root) / name)
    for sub in reversed(folders):
        fsync_dir(sub)


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the folder ``tmp`` to ``path``; an existing ``path`` is moved aside first, put back if
    the rename fails, and removed once the new folder is in place."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = temp_name(path, "old")
    _remove(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], *, what: str = "folder",
                  error: ErrorFactory = FileWriteError) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; when the block ends, sync every file in
    it and rename it to ``path`` (replacing a folder already there).

    ``path`` is then either as it was (any exception: the temporary folder is removed; an I/O failure
    is raised as ``error("cannot write <what> <path>: <OS reason>")``) or the complete new folder.
    """
    path = Path(path)
    tmp = temp_name(path)
    with _failure_as(error, what, path):
        _remove(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        try:
            yield tmp
            _sync_tree(tmp)
            _swap_in(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        fsync_dir(path.parent.resolve())
