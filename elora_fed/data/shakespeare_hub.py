"""The ``flwr-shakespeare`` source: LEAF's Shakespeare from the hub, one client per character.

``flwrlabs/shakespeare`` stores each character's lines as sliding windows: ``x`` holds 80
characters and ``y`` the next one. Training here cuts samples from running text, so each
character's windows are stitched back into one text. The hub dataset needs a reachable hub
or a filled HF cache; offline, ``data.source = "shakespeare"`` builds the same kind of
clients from the Gutenberg plays that ship with the toolkit.

``datasets`` and ``flwr_datasets`` are imported on use: they take seconds to import, and
only this source needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elora_fed.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

HUB_DATASET = "flwrlabs/shakespeare"
COLUMNS = ("character_id", "x", "y")
CLIENT_PREFIX = "flwr:"


def roles_from_dataset(dataset: Dataset) -> dict[str, str]:
    """One text per character, keyed ``flwr:<character_id>`` and sorted by key.

    The dataset is partitioned by ``character_id`` with Flower's ``NaturalIdPartitioner``;
    each partition's windows are stitched in dataset order (see ``stitch_windows``).
    """
    from flwr_datasets.partitioner import NaturalIdPartitioner

    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(f"Shakespeare dataset lacks column(s) {', '.join(missing)}: expected {', '.join(COLUMNS)}")
    partitioner = NaturalIdPartitioner(partition_by="character_id")
    partitioner.dataset = dataset
    roles = {}
    for i in range(partitioner.num_partitions):
        partition = partitioner.load_partition(i)
        client_id = f"{CLIENT_PREFIX}{partitioner.partition_id_to_natural_id[i]}"
        roles[client_id] = stitch_windows(list(partition["x"]), list(partition["y"]))
    return dict(sorted(roles.items()))


def stitch_windows(xs: list[str], ys: list[str]) -> str:
    """Rebuild running text from (window, next character) pairs.

    A window that continues the text so far (equals its tail) adds only its next character;
    any other window starts a new line with the whole window and its next character.
    """
    text = xs[0] + ys[0] if xs else ""
    for x, y in zip(xs[1:], ys[1:], strict=True):
        text += y if text.endswith(x) else "\n" + x + y
    return text


def load_flwr_shakespeare() -> dict[str, str]:
    """Load ``flwrlabs/shakespeare`` (train split) and return ``roles_from_dataset`` of it."""
    import datasets

    try:
        dataset = datasets.load_dataset(HUB_DATASET, split="train")
    except Exception as e:  # datasets raises many types when the hub is unreachable
        raise DataError(
            f"cannot load {HUB_DATASET}: the Hugging Face hub is unreachable and the HF cache does not hold it "
            f'({type(e).__name__}: {e}); use data.source = "shakespeare" for the offline Gutenberg texts'
        ) from e
    return roles_from_dataset(dataset)
