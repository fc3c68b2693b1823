"""Affinity modes: what each client releases in the sketch phase, and how the server estimates from it.

One object owns both halves, so that a mode is one class in one file (``affinity.mode``
takes a built-in name or ``module:Class`` / ``path/file.py:Class``). The client asks its
mode what to release; the server hands the releases, in client order, to the same mode's
``estimate``:

- ``exact``: the clipped (and, with ``privacy``, noised) sketch rows; the surrogate on the
  clients' features;
- ``private``: only additive statistics (``elora_fed.surrogate.statistics``); the surrogate on their sums;
- ``secure``: the private mode's statistics, which stay on the client and reach the
  server only as subset sums through SecAgg+ (``secure_aggregation``);
- ``gradient-cosine``: the sketch rows; the cosine of the clients' mean gradients (baseline).

A release is a ``ClientSketch`` or a ``ClientStatistics`` (the two things the wire and the
run directory know how to carry); ``estimate`` gets a list of them, or a ``SubsetSums``
in a secure mode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from elora_fed.errors import DataError
from elora_fed.plugins import load_class
from elora_fed.privacy.mechanism import NoisedPart, released_sketch, released_statistics, row_parts, statistics_parts
from elora_fed.sketch.client_sketch import ClientSketch
from elora_fed.surrogate.affinity import (
    affinity_from_features,
    affinity_from_statistics,
    affinity_from_subset_sums,
    gradient_cosine_affinity,
)
from elora_fed.surrogate.config import AFFINITY_MODES
from elora_fed.surrogate.quadratic_sums import SubsetSums
from elora_fed.surrogate.statistics import ClientStatistics
from elora_fed.surrogate.task_features import task_features

if TYPE_CHECKING:
    from elora_fed.config import RunConfig

Release = ClientSketch | ClientStatistics
Collected = Sequence[Release] | SubsetSums


class AffinityMode(Protocol):
    """An affinity mode, built as ``Mode(config)`` on every client and on the server."""

    secure_aggregation: ClassVar[bool]
    """True: the release stays on the client and the server's ``estimate`` gets ``SubsetSums`` by SecAgg+."""
    per_sample_rows: ClassVar[bool]
    """True: the release is the client's per-sample sketch rows at theta* (first-order boosting reuses them)."""
    released: ClassVar[str]
    """What leaves a client, in words (the privacy report)."""

    def __init__(self, config: RunConfig) -> None: ...

    def release(self, sketch: ClientSketch) -> Release:
        """What this client sends (or, in a secure mode, keeps for SecAgg+), from its full sketch."""
        ...

    def estimate(self, collected: Collected) -> np.ndarray:
        """The (n, n) affinity of the clients whose releases arrived, in their order."""
        ...

    def privacy_parts(self) -> list[NoisedPart]:
        """The noised parts of one release, for the privacy accountant."""
        ...


def sketches_only(collected: Collected) -> list[ClientSketch]:
    """The clients' sketches, or DataError if a mode that estimates from sketches got statistics."""
    if isinstance(collected, SubsetSums) or not all(isinstance(c, ClientSketch) for c in collected):
        raise DataError("this affinity mode estimates from clients' sketches, and got statistics")
    return [c for c in collected if isinstance(c, ClientSketch)]


class ExactMode:
    """Per-sample sketch rows leave the client; the surrogate is solved on their features (the method)."""

    secure_aggregation: ClassVar[bool] = False
    per_sample_rows: ClassVar[bool] = True
    released: ClassVar[str] = (
        "per-sample projected gradient rows (clipped to clip_norm) and base outputs (clipped to output_bound)"
    )

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def release(self, sketch: ClientSketch) -> Release:
        return released_sketch(sketch, self.config)

    def estimate(self, collected: Collected) -> np.ndarray:
        af, tasks = self.config.affinity, [task_features(s) for s in sketches_only(collected)]
        return affinity_from_features(tasks, min(af.subset_size, len(tasks)), af.num_subsets, af.lam, af.seed).affinity

    def privacy_parts(self) -> list[NoisedPart]:
        return row_parts(self.config.privacy)


class GradientCosineMode(ExactMode):
    """The baseline: the same release as exact mode; affinity = cosine of the clients' mean gradients."""

    def estimate(self, collected: Collected) -> np.ndarray:
        return gradient_cosine_affinity([task_features(s) for s in sketches_only(collected)])


class PrivateMode:
    """Only additive statistics leave the client; the surrogate is solved on their sums."""

    secure_aggregation: ClassVar[bool] = False
    per_sample_rows: ClassVar[bool] = False
    released: ClassVar[str] = "gradient and curvature sums of clipped projected gradient rows (loss sums not released)"

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def release(self, sketch: ClientSketch) -> Release:
        return released_statistics(sketch, self.config)

    def estimate(self, collected: Collected) -> np.ndarray:
        af = self.config.affinity
        if isinstance(collected, SubsetSums):
            size = min(af.subset_size, collected.num_clients)
            return affinity_from_subset_sums(collected, size, af.num_subsets, af.lam, af.seed).affinity
        if not all(isinstance(c, ClientStatistics) for c in collected):
            raise DataError("this affinity mode estimates from clients' statistics, and got sketches")
        stats = [c for c in collected if isinstance(c, ClientStatistics)]
        size = min(af.subset_size, len(stats))
        return affinity_from_statistics(stats, size, af.num_subsets, af.lam, af.seed).affinity

    def privacy_parts(self) -> list[NoisedPart]:
        return statistics_parts(self.config.privacy)


class SecureMode(PrivateMode):
    """The private mode's statistics, summed over subsets by SecAgg+: the server never sees one client's."""

    secure_aggregation: ClassVar[bool] = True


BUILT_IN: dict[str, type[AffinityMode]] = dict(
    zip(AFFINITY_MODES, (ExactMode, PrivateMode, SecureMode, GradientCosineMode), strict=True)
)
"""``affinity.mode``'s names (``elora_fed.surrogate.config.AFFINITY_MODES``, which validates them) and their classes."""


@functools.lru_cache(maxsize=16)
def affinity_mode(config: RunConfig) -> AffinityMode:
    """The mode ``affinity.mode`` names: a built-in name or a user class (ConfigError if it cannot be loaded).

    Cached per config (``RunConfig`` is frozen and hashable): the driver and every sketch
    message ask for it, and a mode given as a file path would otherwise be re-executed each time.
    """
    name = config.affinity.mode
    cls = BUILT_IN.get(name) or load_class(name, "affinity.mode")
    return cls(config)
