"""The per-client train / validation / test split: contiguous blocks, in order.

Samples are cut in their natural order (text order for a role, file order for a task):
train first, then validation, then test. Contiguous blocks keep neighbouring text out of
different splits, and the cut depends on nothing but the order and the fractions.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeVar

from elora_fed.errors import DataError

SPLITS = ("train", "validation", "test")


class _Sliceable(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: slice, /) -> Any: ...


Items = TypeVar("Items", bound=_Sliceable)  # a list or an array: slicing keeps the type


def split_contiguous(client_id: str, items: Items, val_fraction: float, test_fraction: float) -> dict[str, Items]:
    """Validation and test get ``floor(n * fraction)`` items but at least one; train the rest."""
    n = len(items)
    n_val = max(1, math.floor(round(n * val_fraction, 9)))
    n_test = max(1, math.floor(round(n * test_fraction, 9)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"client '{client_id}' has {n} samples: too few to fill train, validation and test splits")
    return {
        "train": items[:n_train],
        "validation": items[n_train : n_train + n_val],
        "test": items[n_train + n_val :],
    }
