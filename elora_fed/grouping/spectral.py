"""The spectral-clustering baseline the SDP clustering (``elora_fed.grouping.clustering``) is compared against."""

from __future__ import annotations

import numpy as np

from elora_fed.grouping.partitions import canonical_labels, check_affinity, check_num_groups, off_diagonal_mean


def _kmeans(X: np.ndarray, m: int, rng: np.random.Generator, restarts: int = 10, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means from k-means++ seeds; the labels of the restart with the least inertia."""
    n = len(X)
    best_labels, best_inertia = np.zeros(n, dtype=np.int64), np.inf
    for _ in range(restarts):
        centers = X[[rng.integers(n)]]
        for _ in range(1, m):
            distance = ((X[:, None, :] - centers[None]) ** 2).sum(-1).min(1)
            total = distance.sum()
            pick = rng.choice(n, p=distance / total) if total > 0 else rng.integers(n)
            centers = np.vstack([centers, X[pick]])
        for _ in range(iterations):
            distance = ((X[:, None, :] - centers[None]) ** 2).sum(-1)
            labels = distance.argmin(1)
            # an emptied center restarts at the point farthest from its own center
            farthest = int(distance[np.arange(n), labels].argmax())
            updated = np.array([X[labels == g].mean(0) if (labels == g).any() else X[farthest] for g in range(m)])
            if np.allclose(updated, centers):
                break
            centers = updated
        inertia = float(distance[np.arange(n), labels].sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def spectral_clustering(T: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """Baseline: normalized spectral clustering (Ng, Jordan and Weiss) on a nonnegative version of T.

    The similarity is W = max(T - mu, 0) off the diagonal, mu = T's mean off-diagonal entry:
    only pairs that help each other more than a typical pair are linked (a constant shift of
    T would otherwise link everything). The m leading eigenvectors of D^-1/2 W D^-1/2 (the
    smallest of the normalized Laplacian), rows normalized to unit length, go to k-means with
    10 k-means++ restarts. Labels are ordered by smallest member index.
    """
    T = check_affinity(T)
    n = len(T)
    check_num_groups(m, n)
    W = np.maximum(T - off_diagonal_mean(T), 0.0)
    np.fill_diagonal(W, 0.0)
    inv_sqrt_degree = 1 / np.sqrt(np.maximum(W.sum(1), 1e-12))
    _, vectors = np.linalg.eigh(inv_sqrt_degree[:, None] * W * inv_sqrt_degree[None, :])
    X = vectors[:, -m:]
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return canonical_labels(_kmeans(X, m, np.random.default_rng(seed)))
