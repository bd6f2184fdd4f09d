"""Offline GPT-2 tokenizer (tiktoken ``gpt2`` / ``r50k_base``).

The BPE merge ranks ship inside the package as ``modelkit/assets/gpt2.tiktoken``
(see ``modelkit/assets/README.md`` for origin and licence).  Nothing in this
module touches the network or writes cache files: :func:`get_tokenizer` reads
the packaged file, verifies its SHA-256, parses it and builds a
:class:`tiktoken.Encoding` equal to ``tiktoken.get_encoding("gpt2")``.

Importing this module does no work beyond defining names; the asset is read
on the first call to :func:`get_tokenizer`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import operator
import os
from importlib import resources
from typing import Iterable, Optional, Union

import tiktoken
import torch

from .errors import ModelkitError

try:  # Python >= 3.11
    from importlib.resources.abc import Traversable
except ImportError:  # pragma: no cover - Python 3.9/3.10
    from importlib.abc import Traversable

__all__ = [
    "ENDOFTEXT",
    "ENDOFTEXT_ID",
    "GPT2_BPE_SHA256",
    "GPT2_N_VOCAB",
    "GPT2_PAT_STR",
    "IncrementalDecoder",
    "TokenizerAssetError",
    "get_tokenizer",
    "text_to_token_ids",
    "token_ids_to_text",
]

#: SHA-256 of ``modelkit/assets/gpt2.tiktoken`` (same hash tiktoken expects
#: for its ``r50k_base.tiktoken`` download).
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

#: Pre-tokenisation regex, identical to ``tiktoken_ext.openai_public.r50k_pat_str``.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
#: Vocabulary size: 50,256 BPE tokens (ranks 0..50255) plus ``<|endoftext|>``.
GPT2_N_VOCAB = 50257

_ASSET_NAME = "gpt2.tiktoken"

PathLike = Union[str, "os.PathLike[str]", Traversable]
TokenIds = Union[torch.Tensor, Iterable[int]]


class TokenizerAssetError(ModelkitError, RuntimeError):
    """The packaged BPE ranks file is missing, corrupted or malformed."""


def _asset_path() -> Traversable:
    """Return the location of the packaged ``gpt2.tiktoken`` (no I/O)."""
    return resources.files(__package__ or "modelkit") / "assets" / _ASSET_NAME


def _load_ranks(
    path: PathLike, expected_sha256: str = GPT2_BPE_SHA256
) -> dict[bytes, int]:
    """Read, verify and parse a ``.tiktoken`` BPE ranks file.

    Promises: returns ``{token_bytes: rank}`` only if the file's SHA-256 equals
    ``expected_sha256``; otherwise raises :class:`TokenizerAssetError` whose
    message names the file, the expected hash and the actual hash.  A file
    with a correct hash but malformed content (a line that is not
    ``<base64> <int>``, or duplicate tokens/ranks) also raises
    :class:`TokenizerAssetError`.  Reads only; never writes, never uses the
    network.
    """
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise TokenizerAssetError(f"cannot read BPE ranks file {path!r}: {exc}") from exc
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TokenizerAssetError(f"cannot read BPE ranks file {str(path)!r}: {exc}") from exc

    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256.lower():
        raise TokenizerAssetError(
            f"BPE ranks file {str(path)!r} failed its integrity check: "
            f"expected sha256 {expected_sha256.lower()}, got sha256 {actual}. "
            "The packaged tokenizer asset is corrupted or was replaced; reinstall modelkit."
        )

    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerAssetError(
                f"{str(path)!r} line {lineno}: expected '<base64 token> <rank>', got {line[:80]!r}"
            )
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError) as exc:
            raise TokenizerAssetError(f"{str(path)!r} line {lineno}: {exc}") from exc
        if token in ranks or rank in seen_ranks:
            raise TokenizerAssetError(
                f"{str(path)!r} line {lineno}: duplicate token or rank {rank}"
            )
        ranks[token] = rank
        seen_ranks.add(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """Return the GPT-2 tokenizer, built from the packaged asset.

    Promises: the result encodes and decodes exactly like
    ``tiktoken.get_encoding("gpt2")`` (same ranks, pattern, special token
    ``<|endoftext|>`` = 50256, ``n_vocab`` 50257); it never touches the network
    and never writes files (tiktoken's download cache is not used).  The same
    object is returned on every call.  Raises :class:`TokenizerAssetError` if
    the packaged file is missing or its SHA-256 does not match
    :data:`GPT2_BPE_SHA256`.
    """
    mergeable_ranks = _load_ranks(_asset_path())
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=GPT2_N_VOCAB,
    )


def _check_id(token_id: object, n_vocab: int) -> int:
    """Return ``token_id`` as an ``int`` in ``[0, n_vocab)`` or raise.

    Raises ``TypeError`` for non-integers (floats, strings, ...) and
    ``ValueError`` naming the id and the vocabulary size if out of range.
    """
    if isinstance(token_id, bool):
        raise TypeError(f"token id must be an int, got bool {token_id!r}")
    try:
        value = operator.index(token_id)  # accepts int, numpy ints, 0-d int tensors
    except TypeError:
        raise TypeError(
            f"token id must be an int, got {type(token_id).__name__} {token_id!r}"
        ) from None
    if not 0 <= value < n_vocab:
        raise ValueError(
            f"token id {value} is out of range for a vocabulary of size {n_vocab} "
            f"(valid ids are 0..{n_vocab - 1})"
        )
    return value


def text_to_token_ids(
    text: str, tokenizer: Optional[tiktoken.Encoding] = None
) -> torch.Tensor:
    """Encode ``text`` into a ``torch.long`` tensor of shape ``(1, n)``.

    Promises: same ids as
    ``tokenizer.encode(text, allowed_special={"<|endoftext|>"})`` (so a literal
    ``<|endoftext|>`` becomes id 50256), with a leading batch dimension of 1.
    Empty text gives shape ``(1, 0)``.  ``tokenizer`` defaults to
    :func:`get_tokenizer`.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    encoded = tok.encode(text, allowed_special={ENDOFTEXT})
    return torch.tensor(encoded, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(
    token_ids: TokenIds, tokenizer: Optional[tiktoken.Encoding] = None
) -> str:
    """Decode token ids into text.

    Accepts a ``(1, n)`` or ``(n,)`` integer tensor, or a flat iterable of
    ints.  Promises: returns ``tokenizer.decode(ids)`` (invalid UTF-8 becomes
    U+FFFD), i.e. the book's ``tokenizer.decode(token_ids.squeeze(0).tolist())``.
    Raises ``ValueError`` for a batch of more than one sequence or a tensor of
    other rank, ``TypeError`` for non-integer tensors/elements, and
    ``ValueError`` naming the offending id and the vocabulary size for any id
    outside ``[0, n_vocab)``.  ``tokenizer`` defaults to :func:`get_tokenizer`.
    """
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids tensor must have an integer dtype, got {token_ids.dtype}")
        if token_ids.dim() == 2:
            if token_ids.shape[0] != 1:
                raise ValueError(
                    f"token_ids_to_text decodes one sequence; got a batch of shape "
                    f"{tuple(token_ids.shape)}. Decode each row separately."
                )
            token_ids = token_ids[0]
        elif token_ids.dim() != 1:
            raise ValueError(
                f"token_ids must have shape (1, n) or (n,), got {tuple(token_ids.shape)}"
            )
        raw = token_ids.tolist()
    else:
        raw = list(token_ids)
    ids = [_check_id(t, tok.n_vocab) for t in raw]
    return tok.decode(ids)


class IncrementalDecoder:
    """Streaming decoder: feed token ids one at a time, get finished text.

    Promises: for any sequence of valid ids, ``"".join(feed(i) for i in ids)
    + flush()`` equals ``tokenizer.decode(ids)``.  ``feed`` returns only
    complete characters: bytes of a UTF-8 character split across tokens are
    held back until the character is complete, so no U+FFFD is emitted for a
    character that is merely unfinished (only for genuinely invalid bytes).
    ``flush`` emits whatever is pending (an unfinished character becomes
    U+FFFD) and resets the decoder for reuse.

    Example::

        dec = IncrementalDecoder()
        for tid in generated_ids:
            print(dec.feed(tid), end="", flush=True)
        print(dec.flush())
    """

    def __init__(self, tokenizer: Optional[tiktoken.Encoding] = None) -> None:
        """Create a decoder; ``tokenizer`` defaults to :func:`get_tokenizer`."""
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (may be ``""``).

        Raises ``ValueError`` (naming the id and vocabulary size) for an id
        outside ``[0, n_vocab)``; the decoder state is unchanged in that case.
        """
        tid = _check_id(token_id, self.tokenizer.n_vocab)
        return self._utf8.decode(self.tokenizer.decode_single_token_bytes(tid), final=False)

    def feed_many(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; return the newly completed text."""
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """Return any pending text (incomplete bytes become U+FFFD) and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    def reset(self) -> None:
        """Discard pending bytes without emitting them."""
        self._utf8.reset()
