"""Partitions of tasks and their scores on an affinity matrix T: input checks, canonical labels,
average and excess density, the adjusted Rand index, and planted test affinities.

Shared by the SDP clustering (``elora_fed.grouping.clustering``) and the spectral baseline
(``elora_fed.grouping.spectral``), and by the experiments that compare groupings.
"""

from __future__ import annotations

import numpy as np

from elora_fed.errors import ConfigError


def check_affinity(T: np.ndarray) -> np.ndarray:
    """T as a float64 array, after checking that it is a finite, square, symmetric matrix."""
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 2 or T.shape[0] != T.shape[1] or T.shape[0] == 0:
        raise ConfigError(f"the affinity matrix must be square and non-empty, got shape {T.shape}")
    if not np.isfinite(T).all():
        raise ConfigError("the affinity matrix contains NaN or infinite entries")
    scale = max(float(np.abs(T).max()), 1e-300)
    if not np.allclose(T, T.T, rtol=1e-6, atol=1e-9 * scale):
        raise ConfigError("the affinity matrix must be symmetric: symmetrize it first, e.g. (T + T.T) / 2")
    return (T + T.T) / 2


def check_num_groups(m: int, n: int) -> None:
    if not 1 <= m <= n:
        raise ConfigError(f"the number of groups m must be between 1 and the number of tasks {n}, got {m}")


def off_diagonal_mean(T: np.ndarray) -> float:
    n = len(T)
    return float((T.sum() - np.trace(T)) / (n * (n - 1))) if n > 1 else 0.0


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel a partition 0..m-1 in the order of each group's smallest member index."""
    labels = np.asarray(labels)
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    mapping = {int(label): g for g, label in enumerate(order)}
    return np.array([mapping[int(label)] for label in labels], dtype=np.int64)


def average_density(T: np.ndarray, labels: np.ndarray) -> float:
    """(1/m) sum_c v_c' T v_c / |c| over the groups c of ``labels`` (diagonal of T included)."""
    T = check_affinity(T)
    labels = np.asarray(labels)
    if labels.shape != (len(T),):
        raise ConfigError(f"labels must have one entry per task ({len(T)}), got shape {labels.shape}")
    densities = [T[np.ix_(group, group)].sum() / group.sum() for group in (labels == g for g in np.unique(labels))]
    return float(np.mean(densities))


def excess_density(T: np.ndarray, labels: np.ndarray) -> float:
    """Average within-cluster density minus its expectation for random groups of the same sizes.

    A random group of size s has expected density tr(T)/n + (s - 1) mu, mu = T's mean
    off-diagonal entry. Both trivial partitions (one group; all singletons) score exactly 0.
    """
    T = check_affinity(T)
    labels = np.asarray(labels)
    sizes = np.array([(labels == g).sum() for g in np.unique(labels)])
    expected = np.trace(T) / len(T) + (sizes - 1) * off_diagonal_mean(T)
    return average_density(T, labels) - float(expected.mean())


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings: 1 when they are the same partition."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"labelings must be 1-D of the same length, got shapes {a.shape} and {b.shape}")
    _, a_index = np.unique(a, return_inverse=True)
    _, b_index = np.unique(b, return_inverse=True)
    table = np.zeros((a_index.max() + 1, b_index.max() + 1))
    np.add.at(table, (a_index, b_index), 1)

    def pairs(counts: np.ndarray) -> float:
        return float((counts * (counts - 1) / 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    if total == 0:  # fewer than two items: no pairs to disagree on
        return 1.0
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (one group, or all singletons)
        return 1.0
    return (index - expected) / (maximum - expected)


def planted_affinity(n: int, m: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic T with m planted groups of near-equal size, and the planted labels.

    T_uv = 1 within a group, 0 across, plus symmetric Gaussian noise of standard deviation
    ``noise``; tasks are assigned to groups in random order.
    """
    check_num_groups(m, n)
    if not noise >= 0:
        raise ConfigError(f"noise must be a standard deviation >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    labels = canonical_labels(rng.permutation(np.arange(n) % m))
    noise_matrix = rng.normal(size=(n, n))
    T = (labels[:, None] == labels[None, :]).astype(np.float64) + noise * (noise_matrix + noise_matrix.T) / np.sqrt(2)
    return T, labels
