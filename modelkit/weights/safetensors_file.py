"""Reading a safetensors file as data: the header validated entry by entry, tensors from one open file.

A file is opened once. Its header is read from that open file and, when tensors are wanted, the same
open file is memory-mapped (copy-on-write, so a tensor written to later never changes the file) and
each tensor is a view of that mapping. A concurrent ``os.replace`` of the path therefore cannot mix
two versions: the reader keeps the inode it opened. Nothing is read into memory but the header;
tensor data is paged in from the mapping as it is used.

Every problem (not a safetensors file, a header that is not JSON, an entry whose dtype, shape or
offsets are wrong or do not tile the data) raises :class:`~modelkit.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from ..errors import CheckpointError
from ..spec import expected_json_type

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAX_DIMS = 32

# safetensors dtype codes -> torch dtypes (those torch has).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    ST_DTYPES |= {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

_Size = Annotated[int, Field(ge=0)]


class _HeaderEntry(BaseModel):
    """One tensor's entry in a safetensors header, with JSON's types (strict)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    dtype: str
    shape: Annotated[list[_Size], Field(max_length=MAX_DIMS)]
    data_offsets: Annotated[list[_Size], Field(min_length=2, max_length=2)]


@dataclass(frozen=True)
class Entry:
    """A tensor the header describes: dtype code, shape and byte range within the data area."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: the raw ``__metadata__`` (unchecked), the tensors, where the
    data starts and how many bytes of it the tensors cover, and the file's size when it was read."""

    metadata: Any
    entries: dict[str, Entry]
    data_offset: int
    data_size: int
    file_size: int


def describe_json(value: Any) -> str:
    """A parsed JSON value as JSON spells it (``true``, ``"8"``, ``{"a": 1}``); at most 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def pydantic_lines(exc: ValidationError, prefix: str) -> list[str]:
    """``"prefix.a[0].b: what is wrong"`` for each error, in JSON's words (expected an integer, got "8")."""
    lines = []
    for err in exc.errors():
        where = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        expected = expected_json_type(err)
        if err["type"] == "missing":
            what = "required, but missing"
        elif err["type"] == "extra_forbidden":
            what = "unknown key"
        elif expected is not None:
            what = f"expected {expected}, got {describe_json(err.get('input'))}"
        else:
            what = f"{err['msg'].removeprefix('Value error, ')} (got {describe_json(err.get('input'))})"
        lines.append(f"{where}: {what}")
    return lines


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key '{key}'")
        seen[key] = value
    return seen


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` rejecting duplicate keys; raises ValueError for anything that is not JSON
    (bad syntax, bad UTF-8, nesting too deep for Python's parser)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def _entry(name: str, raw: Any, path: Path) -> Entry:
    """One header entry, checked: known dtype, sizes, and a byte range that holds exactly the shape."""
    try:
        e = _HeaderEntry.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header:\n  "
                              + "\n  ".join(pydantic_lines(exc, f"header.{name}"))) from None
    if e.dtype not in ST_DTYPES:
        raise CheckpointError(f"{path}: corrupt safetensors header: header.{name}.dtype {e.dtype!r} is not one "
                              f"modelkit reads ({', '.join(ST_DTYPES)})")
    begin, end = e.data_offsets
    numel = 1
    for d in e.shape:
        numel *= d
    nbytes = numel * ST_DTYPES[e.dtype].itemsize
    if end < begin or end - begin != nbytes:
        raise CheckpointError(f"{path}: corrupt safetensors header: header.{name}.data_offsets {[begin, end]} "
                              f"do not hold a {e.dtype} tensor of shape {list(e.shape)} ({nbytes:,} bytes)")
    return Entry(e.dtype, tuple(e.shape), begin, end)


def _tiled(entries: Mapping[str, Entry], path: Path) -> int:
    """The bytes of data the entries cover; raises unless they tile it without gaps or overlaps."""
    pos = 0
    for begin, end, name in sorted((e.begin, e.end, n) for n, e in entries.items()):
        if begin != pos:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor '{name}' starts at data byte "
                                  f"{begin:,}, expected {pos:,} (tensors must follow each other without gaps "
                                  "or overlaps)")
        pos = end
    return pos


def read_header(fh: BinaryIO, path: Path) -> Header:
    """Read and validate the header of the safetensors file open as ``fh`` (at its start)."""
    size = os.fstat(fh.fileno()).st_size
    raw = fh.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n <= 1 or n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path} is not a safetensors file (no valid header); a modelkit "
                              "checkpoint is written by save_checkpoint or `modelkit import-hf`")
    text = fh.read(n)
    try:
        if len(text) != n:
            raise ValueError("short read")
        header = loads_json(text)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError:
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    metadata = header.pop("__metadata__", None)
    entries = {name: _entry(name, raw, path) for name, raw in header.items()}
    return Header(metadata, entries, 8 + n, _tiled(entries, path), size)


def open_file(path: Path, what: str = "checkpoint") -> BinaryIO:
    """``path`` (a ``what``) opened for reading if it is a regular file, or a CheckpointError saying why not.

    Opened non-blocking and checked with ``fstat`` before anything is read, so a FIFO, a device or
    a directory is refused at once instead of blocking or streaming without end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"cannot read {what} {path}: not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_header_of(path: Path) -> Header:
    """The validated header of the safetensors file at ``path``; only the header bytes are read."""
    with open_file(path) as fh:
        try:
            return read_header(fh, path)
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def check_complete(header: Header, path: Path) -> None:
    """Raise unless the file holds exactly the data its header promises."""
    promised = header.data_offset + header.data_size
    if promised != header.file_size:
        raise CheckpointError(f"{path} is truncated or corrupt: its header promises "
                              f"{promised:,} bytes, the file has {header.file_size:,}")


def map_tensors(fh: BinaryIO, header: Header, path: Path) -> dict[str, Callable[[], Tensor]]:
    """``{name: get}`` where ``get()`` is that tensor, a view of a private (copy-on-write) memory map of
    the open file ``fh``: the very file the header was read from. The map lives as long as any tensor."""
    check_complete(header, path)
    try:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot map the tensors of {path}: {exc}") from None
    if len(mapped) != header.file_size:  # the file changed size under us (rewritten in place)
        raise CheckpointError(f"{path} changed while it was read; try again")

    def get(entry: Entry) -> Tensor:
        if entry.begin == entry.end:
            return torch.empty(entry.shape, dtype=entry.torch_dtype)
        flat = torch.frombuffer(mapped, dtype=entry.torch_dtype, offset=header.data_offset + entry.begin,
                                count=(entry.end - entry.begin) // entry.torch_dtype.itemsize)
        return flat.view(entry.shape)

    return {name: (lambda e=e: get(e)) for name, e in header.entries.items()}
