"""Hugging Face tokenizers: a folder's ``tokenizer.json`` through the ``tokenizers`` library.

:class:`HFTokenizer` wraps a ``tokenizers.Tokenizer`` behind the interface modelkit uses of the
GPT-2 tokenizer (:mod:`modelkit.tokenizer`): ``encode``, ``decode``, ``n_vocab`` and ``eot_token``
(the end-of-text id, or None), so :func:`~modelkit.tokenizer.text_to_token_ids`,
:func:`~modelkit.tokenizer.token_ids_to_text` and :func:`incremental_decoder` take either.
It keeps the file's exact bytes (:attr:`HFTokenizer.data`) and their SHA-256, so a checkpoint can
store the file and give it back unchanged (:mod:`modelkit.weights.checkpoint`).

A tokenizer file is data: :func:`read_tokenizer_file` opens only a regular file (a FIFO or a device
is refused before anything is read), reads at most :data:`~modelkit.limits.MAX_TOKENIZER_BYTES`,
and every problem (missing, too large, not UTF-8, not JSON, not a tokenizer) is one
:class:`TokenizerFileError` naming the file. ``tokenizers`` is imported on first use only.

Encoding is ``Tokenizer.encode(text)`` with its post-processor (a BOS token where the file adds
one), as ``transformers``' ``tokenizer(text)``; decoding keeps special tokens, as its ``decode``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union

from .errors import ModelkitError
from .limits import MAX_TOKENIZER_BYTES
from .tokenizer import IncrementalDecoder, _check_id

if TYPE_CHECKING:
    import tiktoken
    import tokenizers

__all__ = ["HFIncrementalDecoder", "HFTokenizer", "TokenizerFileError", "incremental_decoder",
           "read_tokenizer_file"]

#: Tokens of context decoded again before the newest ones, so that a decoder's rules at the start of
#: a text (Metaspace dropping the first space) apply to the context, never to the new text.
_CONTEXT_TOKENS = 6


class TokenizerFileError(ModelkitError, ValueError):
    """A ``tokenizer.json`` is missing, too large, not JSON or not a tokenizer; the message names it."""


def read_tokenizer_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file ``path``, at most ``MAX_TOKENIZER_BYTES`` of them.

    Raises :class:`TokenizerFileError` for a missing or unreadable file, anything but a regular file
    (checked on the open descriptor, without blocking on a FIFO) and a larger file.
    """
    from .errors import CheckpointError
    from .weights.safetensors_file import open_file

    try:
        with open_file(path, "tokenizer file") as fh:
            data = fh.read(MAX_TOKENIZER_BYTES + 1)
    except CheckpointError as exc:
        raise TokenizerFileError(str(exc)) from None
    except OSError as exc:
        raise TokenizerFileError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKENIZER_BYTES:
        raise TokenizerFileError(f"{path}: a tokenizer file may be at most {MAX_TOKENIZER_BYTES:,} bytes "
                                 "(MAX_TOKENIZER_BYTES)")
    return data


def _parse(data: bytes, source: str) -> tokenizers.Tokenizer:
    """``tokenizers.Tokenizer`` of the JSON ``data``, or a TokenizerFileError saying what ``source`` is not."""
    from tokenizers import Tokenizer

    from .weights.safetensors_file import loads_json

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerFileError(f"{source} is not a tokenizer.json: not UTF-8 text") from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for any file it cannot read
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    try:
        parsed = loads_json(text)
    except ValueError as exc:
        raise TokenizerFileError(f"{source} is not a tokenizer.json: not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise TokenizerFileError(f"{source} is not a tokenizer.json: expected a JSON object")
    raise TokenizerFileError(f"{source} is not a tokenizer.json the tokenizers library reads: {reason}")


def _n_vocab(tokenizer: tokenizers.Tokenizer) -> int:
    """One past the largest id ``tokenizer`` has: its model's ids are ``0..size-1``, added tokens may
    come after (or fill gaps). Asks for the added tokens only: listing a 128k vocabulary costs ~0.3 s."""
    n = max([tokenizer.get_vocab_size(with_added_tokens=True),
             *(i + 1 for i in tokenizer.get_added_tokens_decoder())])
    while tokenizer.id_to_token(n) is not None:
        n += 1
    return n


class HFTokenizer:
    """A ``tokenizer.json`` as modelkit's tokenizer interface (see the module docstring).

    ``data`` is the file's bytes, kept unchanged; ``sha256`` their hash; ``n_vocab`` one past the
    largest id the tokenizer knows (added tokens included); ``eot_token`` the end-of-text id, or None.
    """

    def __init__(self, data: bytes, source: str = "tokenizer.json", eos_token_id: int | None = None) -> None:
        """Parse ``data`` (a tokenizer.json's bytes). Raises :class:`TokenizerFileError` naming ``source``
        if it is larger than ``MAX_TOKENIZER_BYTES``, is not a tokenizer with at least one token, or if
        ``eos_token_id`` is not one of its ids."""
        if len(data) > MAX_TOKENIZER_BYTES:
            raise TokenizerFileError(f"{source}: a tokenizer file may be at most {MAX_TOKENIZER_BYTES:,} bytes "
                                     "(MAX_TOKENIZER_BYTES)")
        self.data = bytes(data)
        self.source = source
        self.tokenizer = _parse(self.data, source)
        self.n_vocab = _n_vocab(self.tokenizer)
        if self.n_vocab == 0:
            raise TokenizerFileError(f"{source}: the tokenizer has no tokens")
        if eos_token_id is not None and not 0 <= eos_token_id < self.n_vocab:
            raise TokenizerFileError(f"{source}: end-of-text id {eos_token_id} is not a token of the tokenizer "
                                     f"(ids 0..{self.n_vocab - 1})")
        self.eot_token = eos_token_id
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], eos_token_id: int | None = None) -> HFTokenizer:
        """The tokenizer of the file ``path`` (read by :func:`read_tokenizer_file`)."""
        return cls(read_tokenizer_file(path), str(path), eos_token_id)

    def encode(self, text: str, allowed_special: Any = None) -> list[int]:
        """The ids of ``text``, post-processor included (as ``transformers``' ``tokenizer(text)``).

        ``allowed_special`` is accepted for tiktoken's signature and ignored: the special tokens a
        tokenizer.json declares are always recognised in the text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens included (as ``transformers``' ``decode``)."""
        return self.tokenizer.decode([_check_id(i, self.n_vocab) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, n_vocab={self.n_vocab}, sha256={self.sha256[:12]}...)"


class HFIncrementalDecoder:
    """Streaming decoder for an :class:`HFTokenizer`, with :class:`~modelkit.tokenizer.IncrementalDecoder`'s
    ``feed``/``flush``.

    Promises: after a ``context`` of ids (the prompt), ``"".join(feed(i) for i in ids) + flush()``
    is the text ``ids`` add to the context's: what ``decode(context + ids)`` holds past
    ``decode(context)`` whenever decoding a longer sequence extends the shorter one's text (byte-level
    BPE, Metaspace, WordPiece). Text ending in an unfinished UTF-8 character (U+FFFD) is held back
    until a later token completes it. Each step decodes only the last few tokens.
    """

    def __init__(self, tokenizer: HFTokenizer, context: Sequence[int] = ()) -> None:
        """Create a decoder whose text continues ``context`` (ids already shown)."""
        self.tokenizer = tokenizer
        self._ids = [_check_id(i, tokenizer.n_vocab) for i in context]
        self._read = len(self._ids)  # ids up to here are shown
        self._prefix = max(0, self._read - _CONTEXT_TOKENS)  # decoded again as context

    def _pending(self) -> str:
        """The text of the ids not yet shown, decoded after their context."""
        shown = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        return text[len(shown):] if text.startswith(shown) else text

    def feed(self, token_id: int) -> str:
        """Add one id; return the newly completed text (may be ``""``). Raises ``ValueError`` for an id
        outside the tokenizer's vocabulary, the decoder unchanged."""
        self._ids.append(_check_id(token_id, self.tokenizer.n_vocab))
        text = self._pending()
        if not text or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        """Return the text not yet returned (an unfinished character as U+FFFD)."""
        text = self._pending()
        self._prefix, self._read = self._read, len(self._ids)
        return text


AnyTokenizer = Union["tiktoken.Encoding", HFTokenizer]


def incremental_decoder(tokenizer: AnyTokenizer, context: Sequence[int] = ()
                        ) -> IncrementalDecoder | HFIncrementalDecoder:
    """A streaming decoder for either tokenizer; ``context`` (the prompt's ids) matters to an
    :class:`HFTokenizer` only (GPT-2's tokens decode to the same bytes anywhere)."""
    if isinstance(tokenizer, HFTokenizer):
        return HFIncrementalDecoder(tokenizer, context)
    return IncrementalDecoder(tokenizer)
