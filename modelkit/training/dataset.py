"""Training data: the book's ``GPTDatasetV1`` windows, a train/validation split, and batch samplers.

* :class:`GPTDatasetV1` cuts token ids into input windows of ``max_length`` tokens every ``stride``
  tokens; each target window is its input shifted one token to the right (the book, chapter 2).
* :func:`split_text` holds out the *end* of a text for validation, split by characters before
  tokenising, exactly as the book does (``text[:int(0.9 * len(text))]`` / the rest).
  :func:`split_token_ids` does the same on token ids, for callers that bring tokens.
* :class:`ShardedBatchSampler` yields the index lists of training batches. Every global batch of
  ``batch_size × world_size`` windows is drawn from a per-epoch permutation that depends only on
  ``(seed, epoch)``; rank ``r`` takes every ``world_size``-th window of it, starting at ``r``, as
  ``torch.utils.data.DistributedSampler`` does. The data position is therefore just the number of
  global batches consumed, which makes resuming exact, and the union of the ranks' batches at a
  step is exactly the batch a single process with the same global batch size sees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import tiktoken
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ModelkitError
from ..tokenizer import ENDOFTEXT, get_tokenizer

TokenSource = str | Sequence[int] | Tensor


class DataError(ModelkitError, ValueError):
    """The training data cannot be used as asked (too short for a window or a batch, bad split...)."""


def tokenize(text: str, tokenizer: tiktoken.Encoding | None = None) -> Tensor:
    """GPT-2 token ids of ``text`` as a 1-D ``torch.long`` tensor (``<|endoftext|>`` allowed)."""
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    return torch.tensor(tok.encode(text, allowed_special={ENDOFTEXT}), dtype=torch.long)


def as_token_ids(source: TokenSource, tokenizer: tiktoken.Encoding | None = None) -> Tensor:
    """A 1-D ``torch.long`` tensor of token ids: ``source`` tokenised if it is text, else converted."""
    if isinstance(source, str):
        return tokenize(source, tokenizer)
    ids = source if isinstance(source, Tensor) else torch.as_tensor(list(source), dtype=torch.long)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DataError(f"token ids must be integers, got a {ids.dtype} tensor")
    return ids.reshape(-1).to(torch.long)


class GPTDatasetV1(Dataset[tuple[Tensor, Tensor]]):
    """The book's GPTDatasetV1: windows ``(input_ids, target_ids)``, each of ``max_length`` tokens.

    Window ``i`` starts at token ``i * stride``; its target is the same span shifted by one token.
    As in the book, windows start at ``0, stride, 2*stride, ...`` while the start is below
    ``len(token_ids) - max_length``, so ``len(self) == ceil((n_tokens - max_length) / stride)``.
    ``txt`` is text (tokenised with ``tokenizer``, default GPT-2) or token ids. Windows are views of
    one token tensor, so a long text costs its tokens once, not once per window.
    """

    def __init__(self, txt: TokenSource, tokenizer: tiktoken.Encoding | None = None,
                 max_length: int = 256, stride: int = 128) -> None:
        if max_length < 1 or stride < 1:
            raise DataError(f"max_length and stride must be at least 1, got {max_length} and {stride}")
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.token_ids = as_token_ids(txt, self.tokenizer)
        self.max_length, self.stride = max_length, stride
        self.starts = range(0, max(len(self.token_ids) - max_length, 0), stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        start = self.starts[idx]
        return (self.token_ids[start:start + self.max_length],
                self.token_ids[start + 1:start + self.max_length + 1])


def create_dataloader_v1(txt: TokenSource, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                         tokenizer: tiktoken.Encoding | None = None) -> DataLoader[tuple[Tensor, Tensor]]:
    """The book's ``create_dataloader_v1``: a DataLoader over :class:`GPTDatasetV1` windows.

    Batches are ``(inputs, targets)``, each ``(batch_size, max_length)``. Shuffling uses torch's
    global random generator, as in the book.
    """
    dataset = GPTDatasetV1(txt, tokenizer, max_length=max_length, stride=stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """``(train_text, val_text)``: the first ``1 - val_fraction`` of the characters, and the rest.

    The book's split (``train_ratio = 0.90``, ``split_idx = int(train_ratio * len(text))``), done on
    characters before tokenising so no window straddles the two parts.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    split_idx = int((1.0 - val_fraction) * len(text))
    return text[:split_idx], text[split_idx:]


def split_token_ids(ids: Tensor, val_fraction: float) -> tuple[Tensor, Tensor]:
    """``(train_ids, val_ids)``: the first ``1 - val_fraction`` of the tokens, and the rest."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    split_idx = int((1.0 - val_fraction) * len(ids))
    return ids[:split_idx], ids[split_idx:]


def fingerprint(ids: Tensor) -> str:
    """SHA-256 of a token-id tensor (its int64 bytes); identifies the data a run was trained on."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The order of ``n`` windows in ``epoch``: a permutation depending only on ``(seed, epoch)``.

    Uses its own ``torch.Generator`` (seeded ``seed + epoch``, as ``DistributedSampler``, wrapped
    modulo 2**64 so every seed torch takes works for every epoch), so it never touches the global
    random state.
    """
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator()
    generator.manual_seed((seed + epoch) % 2**64)
    return torch.randperm(n, generator=generator)


class ShardedBatchSampler(Sampler[list[int]]):
    """Index lists of this rank's training batches, for global batches ``start, ..., stop - 1``.

    ``batch_size`` is per rank; a global batch holds ``batch_size * world_size`` windows of the
    epoch's permutation (incomplete global batches at the end of an epoch are dropped, as the book's
    ``drop_last=True``) and rank ``r`` gets windows ``r, r + world_size, ...`` of it. Global batch
    ``k`` belongs to epoch ``k // batches_per_epoch``.
    """

    def __init__(self, num_windows: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, start: int = 0, stop: int | None = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.num_windows, self.batch_size = num_windows, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = num_windows // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training split has {num_windows} windows, fewer than one global batch of "
                f"{self.global_batch_size} ({batch_size} per rank x {world_size} ranks); use more text, "
                "a smaller batch size, a smaller max_length or a smaller stride"
            )
        self.start = start
        self.stop = stop if stop is not None else self.batches_per_epoch

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def global_batch(self, k: int) -> Tensor:
        """Window indices of global batch ``k`` (all ranks together), in order."""
        epoch, within = divmod(k, self.batches_per_epoch)
        perm = epoch_permutation(self.num_windows, self.seed, epoch, self.shuffle)
        return perm[within * self.global_batch_size:(within + 1) * self.global_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        perm, perm_epoch = None, -1
        for k in range(self.start, self.stop):
            epoch, within = divmod(k, self.batches_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.num_windows, self.seed, epoch, self.shuffle), epoch
            assert perm is not None
            batch = perm[within * self.global_batch_size:(within + 1) * self.global_batch_size]
            yield batch[self.rank::self.world_size].tolist()


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The indices ``rank, rank + world_size, ...`` below ``n``: this rank's share of ``n`` items."""
    return list(range(rank, n, world_size))


def make_train_loader(dataset: GPTDatasetV1, batch_size: int, *, rank: int = 0, world_size: int = 1,
                      seed: int = 0, shuffle: bool = True, start: int = 0,
                      stop: int | None = None) -> DataLoader[tuple[Tensor, Tensor]]:
    """A DataLoader over this rank's batches of global batches ``start..stop-1`` (see the sampler).

    Iterating it leaves torch's global random state untouched, so dropout draws do not depend on
    where a run was resumed.
    """
    sampler = ShardedBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=shuffle, start=start, stop=stop)
    # its own generator: creating the iterator then draws no number from torch's global RNG
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0, generator=torch.Generator())
