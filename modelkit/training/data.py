"""Data preparation: the text or token ids of a run turned into training and validation windows.

The validation text is the last ``val_fraction`` of the characters (of the tokens, for token ids)
unless the caller gives its own; both splits become :class:`~modelkit.training.dataset.GPTDatasetV1` windows.
"""

from __future__ import annotations

from torch import Tensor

from .dataset import DataError, GPTDatasetV1, TokenSource, as_token_ids, split_text, split_token_ids
from .config import TrainConfig

__all__ = ["prepare_data"]


def prepare_data(data: TokenSource, val_data: TokenSource | None, config: TrainConfig, max_length: int,
                 stride: int, vocab_size: int) -> tuple[GPTDatasetV1, GPTDatasetV1 | None, Tensor, Tensor]:
    """``(train_set, val_set, train_ids, val_ids)``; ``val_set`` is None when there is no validation text.

    Raises :class:`~modelkit.training.dataset.DataError` for a token id outside the vocabulary or a split too
    short for one window.
    """
    train_ids, val_ids = _split(data, val_data, config.val_fraction)
    for label, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise DataError(f"the {label} data hold token id {bad}, outside the model's vocabulary "
                            f"0..{vocab_size - 1} (vocab_size {vocab_size}; GPT-2 text needs 50257)")
    train_set = GPTDatasetV1(train_ids, max_length=max_length, stride=stride)
    if len(train_set) == 0:
        raise DataError(f"the training split has {len(train_ids)} tokens, not enough for one window of "
                        f"max_length {max_length} (it needs more than {max_length} tokens)")
    val_set = None
    if len(val_ids) > 0:
        val_set = GPTDatasetV1(val_ids, max_length=max_length, stride=stride)
        if len(val_set) == 0:
            raise DataError(f"the validation split has {len(val_ids)} tokens, not enough for one window of "
                            f"max_length {max_length}; raise val_fraction, lower max_length, or set "
                            "val_fraction to 0 to train without validation")
    return train_set, val_set, train_ids, val_ids


def _split(data: TokenSource, val_data: TokenSource | None, val_fraction: float) -> tuple[Tensor, Tensor]:
    """Training and validation token ids: ``val_data`` when given, else the tail of ``data``."""
    if val_data is not None:
        return as_token_ids(data), as_token_ids(val_data)
    if isinstance(data, str):
        train_text, val_text = split_text(data, val_fraction)
        return as_token_ids(train_text), as_token_ids(val_text)
    return split_token_ids(as_token_ids(data), val_fraction)
