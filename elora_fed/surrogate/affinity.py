"""Task affinity from surrogate fine-tuning of sampled subsets (docs/METHOD.md §4), and the gradient-cosine baseline.

Sample subsets of a fixed size so that every pair of tasks shares at least one subset,
estimate every member's validation loss after fine-tuning on each subset (``surrogate``),
and average: T_ij = mean of f^_i(S) over the subsets S that contain both i and j. f is a
loss, so the affinity is the gain over i's single-task estimate, A_ij = f^_i({i}) - T_ij
(higher: j helps i), symmetrized. Clustering then maximizes within-group affinity.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elora_fed.errors import ConfigError, DataError
from elora_fed.surrogate.quadratic_sums import PooledStatistics, SubsetSums, solve_subset_sums
from elora_fed.surrogate.statistics import ClientStatistics, client_statistics
from elora_fed.surrogate.subset_batches import SubsetEstimates
from elora_fed.surrogate.subset_solver import solve_subsets
from elora_fed.surrogate.task_features import TaskFeatures


def sample_subsets(n: int, size: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` uniformly random subsets of ``size`` tasks, then greedy ones until every pair is covered.

    Deterministic for a seed; each subset is a sorted tuple (random subsets may repeat). The
    greedy phase starts each extra subset from the task with the most uncovered pairs and
    adds the task that covers the most uncovered pairs with the members so far (ties: the
    one with more uncovered pairs, then the lower index). Each extra subset covers at least
    one new pair, so at most U extra subsets are added, where U is the number of pairs the
    random ones leave uncovered; at least ceil(U / (size (size - 1) / 2)) are needed. In
    expectation U = C(n, 2) (1 - size (size - 1) / (n (n - 1)))^count. Measured with seed 0:
    n = 10, size 3, count 200: U = 0, no extra subset. n = 500, size 25, count 2000:
    U ~ 1,000, 42 extra. n = 500, size 10, count 2000: 2000 subsets hold at most 90,000
    of the 124,750 pairs, U ~ 60,600, and the greedy phase adds 2,105 subsets (4,105 in
    all; count = 0, greedy only, needs 3,623; no cover has fewer than C(n, 2) / C(size, 2)
    = 2,773). Small subsets of many tasks therefore cost far more subsets than ``count``.
    """
    if n < 2:
        raise ConfigError(f"task affinity needs at least 2 tasks, got {n}")
    if not 2 <= size <= n:
        raise ConfigError(f"subset size must be between 2 and the number of tasks ({n}), got {size}")
    if count < 0:
        raise ConfigError(f"subset count must be >= 0, got {count}")
    rng = np.random.default_rng(seed)
    subsets = [tuple(sorted(int(i) for i in rng.choice(n, size, replace=False))) for _ in range(count)]
    uncovered = ~np.eye(n, dtype=bool)
    if subsets:
        members = np.asarray(subsets)
        uncovered[members[:, :, None], members[:, None, :]] = False
    while uncovered.any():
        degree = uncovered.sum(1)
        chosen = [int(np.argmax(degree))]
        gain = uncovered[chosen[0]].astype(np.int64)
        for _ in range(size - 1):
            score = gain * (n + 1) + degree
            score[chosen] = -1
            chosen.append(int(np.argmax(score)))
            gain += uncovered[chosen[-1]]
        subset = tuple(sorted(chosen))
        uncovered[np.ix_(subset, subset)] = False
        subsets.append(subset)
    return subsets


def task_affinity(estimates: SubsetEstimates, singles: np.ndarray, n: int) -> np.ndarray:
    """Symmetric (n, n) affinity A_ij = f^_i({i}) - T_ij, symmetrized, zero diagonal.

    T_ij is the mean of f^_i(S) over the subsets in ``estimates`` that contain i and j;
    ``singles[i]`` is f^_i({i}) from the same solver and lam. Every pair must be covered.
    """
    singles = np.asarray(singles, dtype=np.float64)
    if singles.shape != (n,):
        raise DataError(f"need one single-task estimate per task: shape ({n},), got {singles.shape}")
    sums = np.zeros(n * n)
    counts = np.zeros(n * n)
    for size in sorted({len(s) for s in estimates.subsets}):
        rows = [k for k, s in enumerate(estimates.subsets) if len(s) == size]
        members = np.asarray([estimates.subsets[k] for k in rows], dtype=np.int64).reshape(len(rows), size)
        if members.size and members.max() >= n:
            raise DataError(f"a subset has a task index >= n = {n}")
        i, j = np.nonzero(~np.eye(size, dtype=bool))  # ordered member pairs (i, j), i != j
        pair = (members[:, i] * n + members[:, j]).ravel()
        sums += np.bincount(pair, weights=estimates.losses[rows][:, i].ravel(), minlength=n * n)
        counts += np.bincount(pair, minlength=n * n)
    shared = counts.reshape(n, n)
    missing = np.argwhere((shared == 0) & ~np.eye(n, dtype=bool))
    if len(missing):
        raise DataError(
            f"{len(missing) // 2} task pairs share no subset (e.g. {tuple(missing[0])}); sample the subsets with "
            "sample_subsets, which covers every pair"
        )
    together = sums.reshape(n, n) / np.maximum(shared, 1)
    gain = singles[:, None] - together
    affinity = (gain + gain.T) / 2
    np.fill_diagonal(affinity, 0.0)
    return affinity


def task_offsets(affinity: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares main effects of a symmetric affinity off its diagonal: A_ij ~ mu + r_i + r_j.

    r_i is how much task i gains (or loses) from every partner alike: a property of i, not
    of the pair. Closed form (with sum r = 0): mu is the off-diagonal mean and
    r_i = (s_i - (n - 1) mu) / (n - 2), s_i being row i's off-diagonal sum.
    """
    a = np.asarray(affinity, dtype=np.float64)
    n = a.shape[0]
    if a.shape != (n, n) or n < 3:
        raise DataError(f"task offsets need a square affinity of at least 3 tasks, got shape {a.shape}")
    off = ~np.eye(n, dtype=bool)
    mu = float(a[off].mean())
    rows = np.where(off, a, 0.0).sum(1)
    return mu, (rows - (n - 1) * mu) / (n - 2)


def remove_offsets(affinity: np.ndarray) -> np.ndarray:
    """The affinity without its per-task main effects (``task_offsets``): what only the pair explains.

    A task that every subset helps (or hurts) otherwise dominates its row and column, and
    the clustering groups by that level instead of by which partners help which.
    """
    mu, r = task_offsets(affinity)
    residual = np.asarray(affinity, dtype=np.float64) - mu - r[:, None] - r[None, :]
    np.fill_diagonal(residual, 0.0)
    return residual


def offset_variance_share(affinity: np.ndarray) -> float:
    """The share of the off-diagonal variance of the affinity that the per-task offsets explain."""
    a = np.asarray(affinity, dtype=np.float64)
    off = ~np.eye(a.shape[0], dtype=bool)
    total = float(((a[off] - a[off].mean()) ** 2).sum())
    return 1.0 - float((remove_offsets(a)[off] ** 2).sum()) / total if total > 0 else 0.0


@dataclass(frozen=True)
class AffinityResult:
    """An affinity matrix and what produced it; ``seconds`` per stage (sample, statistics, solve, singles, affinity)."""

    affinity: np.ndarray
    estimates: SubsetEstimates
    singles: SubsetEstimates
    seconds: dict[str, float]


def affinity_from_features(
    tasks: Sequence[TaskFeatures], size: int, count: int, lam: float, seed: int, private: bool = False
) -> AffinityResult:
    """Sample pair-covering subsets, solve them and the singletons (exact or private mode), and build the affinity."""
    if private:
        start = time.perf_counter()
        stats = [client_statistics(t) for t in tasks]
        result = affinity_from_statistics(stats, size, count, lam, seed)
        return dataclasses.replace(result, seconds={"statistics": time.perf_counter() - start, **result.seconds})
    return _affinity(len(tasks), size, count, seed, lambda subsets: solve_subsets(tasks, subsets, lam))


def affinity_from_statistics(
    stats: Sequence[ClientStatistics], size: int, count: int, lam: float, seed: int
) -> AffinityResult:
    """The private mode from the clients' additive statistics alone (what a server in that mode receives)."""
    return affinity_from_subset_sums(PooledStatistics(stats), size, count, lam, seed)


def affinity_from_subset_sums(sums: SubsetSums, size: int, count: int, lam: float, seed: int) -> AffinityResult:
    """The private and secure modes: the affinity from every sampled subset's summed statistics.

    ``sums`` supplies each subset's summed train statistics and its members' validation
    losses: pooled on the server from per-client statistics (private mode,
    ``PooledStatistics``) or one secure aggregation per subset with the losses evaluated
    by each client (secure mode, ``strategies.secure_statistics``). Both are solved by
    ``solve_subset_sums``; the singletons come from ``sums.singles``.
    """
    return _affinity(
        sums.num_clients,
        size,
        count,
        seed,
        lambda subsets: solve_subset_sums(sums, subsets, lam),
        singles=lambda: sums.singles(lam),
    )


def _affinity(
    n: int,
    size: int,
    count: int,
    seed: int,
    solve: Callable[[Sequence[tuple[int, ...]]], SubsetEstimates],
    singles: Callable[[], SubsetEstimates] | None = None,
) -> AffinityResult:
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal start
        now = time.perf_counter()
        seconds[stage] = now - start
        start = now

    subsets = sample_subsets(n, size, count, seed)
    lap("sample")
    estimates = solve(subsets)
    lap("solve")
    alone = singles() if singles is not None else solve([(i,) for i in range(n)])
    lap("singles")
    affinity = task_affinity(estimates, alone.losses[:, 0], n)
    lap("affinity")
    return AffinityResult(affinity, estimates, alone, seconds)


def mean_train_gradient(task: TaskFeatures) -> torch.Tensor:
    """A task's mean train loss gradient in sketch space, mean_s loss'(b_s) g_s (float64, length d)."""
    return -(torch.sigmoid(-task.train_outputs.double()) @ task.train_features.double()) / len(task.train_outputs)


def gradient_cosine_affinity(tasks: Sequence[TaskFeatures]) -> np.ndarray:
    """Cosine similarity of the tasks' mean train loss gradients (``mean_train_gradient``); zero diagonal."""
    return cosine_affinity([mean_train_gradient(t) for t in tasks])


def cosine_affinity(vectors: Sequence[torch.Tensor]) -> np.ndarray:
    """Pairwise cosine similarity of one vector per task; zero diagonal; a zero vector is 0 to every other."""
    dims = sorted({len(v) for v in vectors})
    if len(dims) != 1:
        raise DataError(f"need tasks that share one sketch dimension d, got dimensions {dims}")
    gradients = torch.stack([v.double() for v in vectors])
    norms = torch.linalg.vector_norm(gradients, dim=1, keepdim=True)
    unit = torch.where(norms > 0, gradients / norms, 0.0)
    cosine = (unit @ unit.T).numpy()
    np.fill_diagonal(cosine, 0.0)
    return cosine
