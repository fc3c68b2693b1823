"""The additive statistics of the private-statistics mode (docs/METHOD.md §3), and their wire and file formats.

Instead of per-sample features, a client can send a second-order expansion of its losses
around w = 0 (counts, loss sums, gradient sums, d x d curvature sums; train and
validation): ``ClientStatistics``, formed by ``client_statistics``. They are additive, so
a subset's statistics are its members' sums and can go through secure aggregation.
Formats: ``statistics_arrays`` / ``statistics_from_arrays`` (named arrays, as they travel
in messages), ``aggregation_vector`` / ``statistics_from_aggregate`` (the vector SecAgg+
sums), ``save_statistics`` / ``load_statistics`` (one ``.npz`` of all clients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from elora_fed.errors import DataError

if TYPE_CHECKING:
    from elora_fed.surrogate.task_features import TaskFeatures


@dataclass(frozen=True)
class SplitStatistics:
    """Additive statistics of one split's losses around w = 0.

    count = n, loss = sum loss(b_s), grad = sum loss'(b_s) g_s (d,), curv = sum loss''(b_s) g_s g_s^T (d, d).
    The split's mean loss at w is then, to second order,
    (loss + grad . w + w^T curv w / 2) / count.
    """

    count: torch.Tensor
    loss: torch.Tensor
    grad: torch.Tensor
    curv: torch.Tensor

    def __add__(self, other: SplitStatistics) -> SplitStatistics:
        return SplitStatistics(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class ClientStatistics:
    """What a client sends in private-statistics mode: no per-sample feature ever leaves it."""

    train: SplitStatistics
    validation: SplitStatistics

    def __add__(self, other: ClientStatistics) -> ClientStatistics:
        return ClientStatistics(self.train + other.train, self.validation + other.validation)

    @property
    def dim(self) -> int:
        return int(self.train.grad.shape[0])


def split_statistics(
    outputs: torch.Tensor, features: torch.Tensor, dtype: torch.dtype = torch.float32
) -> SplitStatistics:
    """The second-order statistics of rows (b, g): accumulated in float64, stored (and sent) as ``dtype``."""
    b = outputs.to(torch.float64)
    g = features.to(torch.float64)
    p = torch.sigmoid(-b)  # -loss'(b)
    sums = (torch.tensor(float(len(b))), F.softplus(-b).sum(), -(p @ g), g.T @ ((p * (1 - p))[:, None] * g))
    return SplitStatistics(*(t.to(dtype) for t in sums))


def client_statistics(task: TaskFeatures, dtype: torch.dtype = torch.float32) -> ClientStatistics:
    """A client's train and validation statistics: 2 (d^2 + d + 2) numbers of ``dtype`` (1.3 MB at d = 400, float32)."""
    return ClientStatistics(
        split_statistics(task.train_outputs, task.train_features, dtype),
        split_statistics(task.val_outputs, task.val_features, dtype),
    )


STATISTIC_FIELDS = ("count", "loss", "grad", "curv")


def statistics_arrays(stats: ClientStatistics) -> dict[str, np.ndarray]:
    """The statistics as named arrays (``train.grad``, ...): how they travel and are stored."""
    return {
        f"{split}.{name}": getattr(getattr(stats, split), name).cpu().numpy()
        for split in ("train", "validation")
        for name in STATISTIC_FIELDS
    }


def aggregation_vector(stats: SplitStatistics) -> np.ndarray:
    """What secure aggregation sums of one split: count, grad, then curv's upper triangle row by row (float64).

    d (d + 1) / 2 + d + 1 numbers (curv is symmetric). The loss sum is left out: w_S does
    not depend on it, and a member's validation losses are evaluated by the member itself.
    """
    d = int(stats.grad.shape[0])
    parts = [stats.count.reshape(1), stats.grad, stats.curv.cpu().numpy()[np.triu_indices(d)]]
    return np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts])


def statistics_from_aggregate(vector: np.ndarray, dim: int) -> SplitStatistics:
    """Inverse of ``aggregation_vector`` (curv mirrored from its upper triangle; loss 0, not aggregated).

    DataError if the length does not fit ``dim`` or a value is not finite.
    """
    vector = np.asarray(vector, dtype=np.float64)
    size = 1 + dim + dim * (dim + 1) // 2
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise DataError(f"an aggregated statistics vector of d = {dim} has {size} finite entries, got {vector.shape}")
    curv = np.zeros((dim, dim))
    curv[np.triu_indices(dim)] = vector[1 + dim :]
    curv = curv + np.triu(curv, 1).T
    return SplitStatistics(*(torch.as_tensor(t) for t in (vector[0], np.float64(0.0), vector[1 : 1 + dim], curv)))


def statistics_from_arrays(arrays: dict[str, np.ndarray], dim: int) -> ClientStatistics:
    """Inverse of ``statistics_arrays``; DataError naming a missing, misshapen or non-finite field."""
    shapes = {"count": (), "loss": (), "grad": (dim,), "curv": (dim, dim)}
    splits = {}
    for split in ("train", "validation"):
        values = []
        for name in STATISTIC_FIELDS:
            key = f"{split}.{name}"
            if key not in arrays:
                raise DataError(f"malformed statistics: '{key}' is missing")
            value = np.asarray(arrays[key])
            if shapes[name] == () and value.shape == (1,):
                value = value.reshape(())  # a scalar may travel as a 1-element array
            if value.shape != shapes[name] or not np.isfinite(value).all():
                raise DataError(f"malformed statistics: '{key}' has shape {value.shape} or non-finite values")
            values.append(torch.as_tensor(value))
        splits[split] = SplitStatistics(*values)
    return ClientStatistics(splits["train"], splits["validation"])


def save_statistics(path: Path, client_ids: Sequence[str], stats: Sequence[ClientStatistics]) -> None:
    """All clients' statistics in one ``.npz``, atomically, with the client ids."""
    arrays: dict[str, np.ndarray] = {"client_ids": np.array(list(client_ids))}
    arrays.update({f"{i}/{k}": v for i, s in enumerate(stats) for k, v in statistics_arrays(s).items()})
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def load_statistics(path: Path) -> tuple[list[str], list[ClientStatistics]]:
    with np.load(path) as data:
        ids = [str(c) for c in data["client_ids"]]
        dim = int(data["0/train.grad"].shape[0])
        stats = [
            statistics_from_arrays({k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}, dim)
            for i in range(len(ids))
        ]
    return ids, stats
