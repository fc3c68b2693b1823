from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from elora_fed.errors import ConfigError, DataError
from elora_fed.surrogate.affinity import (
    affinity_from_features,
    gradient_cosine_affinity,
    sample_subsets,
    task_affinity,
)
from elora_fed.surrogate.subset_batches import SubsetEstimates
from elora_fed.surrogate.task_features import TaskFeatures


@pytest.mark.parametrize("n, size, count", [(10, 3, 200), (10, 3, 5), (12, 4, 0), (30, 5, 40), (7, 7, 2), (2, 2, 0)])
def test_subsets_cover_every_pair_and_are_deterministic(n, size, count):
    subsets = sample_subsets(n, size, count, seed=4)
    assert len(subsets) >= count
    assert all(len(s) == size and list(s) == sorted(set(s)) and s[0] >= 0 and s[-1] < n for s in subsets)
    covered = {pair for s in subsets for pair in itertools.combinations(s, 2)}
    assert covered == set(itertools.combinations(range(n), 2))
    assert sample_subsets(n, size, count, seed=4) == subsets
    if count and size < n:
        assert sample_subsets(n, size, count, seed=5)[:count] != subsets[:count]


def test_subset_sampling_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        sample_subsets(1, 1, 3, 0)
    with pytest.raises(ConfigError, match="between 2 and"):
        sample_subsets(5, 6, 3, 0)
    with pytest.raises(ConfigError, match="between 2 and"):
        sample_subsets(5, 1, 3, 0)
    with pytest.raises(ConfigError, match=">= 0"):
        sample_subsets(5, 2, -1, 0)


def estimates(subsets: list[tuple[int, ...]], losses: list[list[float]]) -> SubsetEstimates:
    padded = np.full((len(subsets), max(map(len, subsets))), np.nan)
    for k, row in enumerate(losses):
        padded[k, : len(row)] = row
    n = len(subsets)
    return SubsetEstimates(tuple(subsets), 0.1, torch.zeros(n, 2), padded, np.ones(n, np.int64), np.zeros(n))


def test_task_affinity_is_the_symmetrized_gain_over_single_task_estimates():
    est = estimates([(0, 1), (0, 1, 2), (1, 2), (0, 2)], [[1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0], [8.0, 9.0]])
    singles = np.array([10.0, 20.0, 30.0])
    # T_01 = mean(1, 3), T_10 = mean(2, 4), T_02 = mean(3, 8), T_20 = mean(5, 9), T_12 = mean(4, 6), T_21 = mean(5, 7)
    gain = np.array([[0, 10 - 2, 10 - 5.5], [20 - 3, 0, 20 - 5], [30 - 7, 30 - 6, 0]])
    np.testing.assert_allclose(task_affinity(est, singles, 3), (gain + gain.T) / 2)


def test_task_affinity_rejects_uncovered_pairs_and_bad_singles():
    est = estimates([(0, 1), (1, 2)], [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(DataError, match="1 task pairs share no subset"):
        task_affinity(est, np.zeros(3), 3)
    with pytest.raises(DataError, match="one single-task estimate per task"):
        task_affinity(est, np.zeros(2), 3)
    with pytest.raises(DataError, match="index >= n"):
        task_affinity(est, np.zeros(2), 2)


def planted_tasks(per_group: int = 4, d: int = 16, seed: int = 0) -> list[TaskFeatures]:
    """Two groups of tasks: gradients agree within a group and point the opposite way across groups."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    tasks = []
    for i in range(2 * per_group):
        sign = 1.0 if i < per_group else -1.0

        def rows(count: int, sign: float = sign) -> tuple[torch.Tensor, torch.Tensor]:
            g = sign * direction + 0.3 * rng.normal(size=(count, d))
            return torch.tensor(rng.normal(-1.0, 0.5, count), dtype=torch.float32), torch.tensor(g, dtype=torch.float32)

        tasks.append(TaskFeatures(f"t{i}", *rows(20), *rows(10)))
    return tasks


@pytest.mark.parametrize("private", [False, True])
def test_planted_groups_have_higher_affinity_within_than_across(private):
    tasks = planted_tasks()
    result = affinity_from_features(tasks, size=3, count=30, lam=0.1, seed=0, private=private)
    group = np.arange(8) < 4
    within = group[:, None] == group[None, :]
    off = ~np.eye(8, dtype=bool)
    assert result.affinity[within & off].min() > result.affinity[~within].max()
    np.testing.assert_array_equal(result.affinity, result.affinity.T)
    assert set(result.seconds) == {"sample", "solve", "singles", "affinity"} | ({"statistics"} if private else set())
    assert result.singles.subsets == tuple((i,) for i in range(8)) and len(result.estimates.subsets) >= 30


def test_gradient_cosine_separates_the_planted_groups():
    cosine = gradient_cosine_affinity(planted_tasks())
    group = np.arange(8) < 4
    within = (group[:, None] == group[None, :]) & ~np.eye(8, dtype=bool)
    assert cosine[within].min() > 0.8 and cosine[group[:, None] != group[None, :]].max() < -0.8
    assert np.diag(cosine).tolist() == [0.0] * 8 and np.allclose(cosine, cosine.T)


def test_gradient_cosine_of_a_zero_gradient_is_zero():
    task = planted_tasks()[0]
    zero = TaskFeatures(
        "z", task.train_outputs, torch.zeros_like(task.train_features), task.val_outputs, task.val_features
    )
    assert gradient_cosine_affinity([task, zero]).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_removing_task_offsets_recovers_the_pair_structure_under_them():
    from elora_fed.grouping.clustering import cluster
    from elora_fed.grouping.partitions import adjusted_rand_index
    from elora_fed.surrogate.affinity import offset_variance_share, remove_offsets, task_offsets

    rng = np.random.default_rng(0)
    n = 24
    blocks = np.repeat(np.arange(3), 8)
    pairs = np.where(blocks[:, None] == blocks[None, :], 0.2, -0.1)
    r = rng.normal(0, 2.0, size=n)  # per-task levels, ten times the pair effects
    r -= r.mean()
    a = 0.5 + r[:, None] + r[None, :] + pairs
    np.fill_diagonal(a, 0.0)
    mu, fitted = task_offsets(a)
    assert mu == pytest.approx(a[~np.eye(n, dtype=bool)].mean())
    residual = remove_offsets(a)
    off = ~np.eye(n, dtype=bool)
    # the fitted offsets are the planted ones, up to what the block pattern adds to every row alike
    np.testing.assert_allclose(fitted - fitted.mean(), r - r.mean(), atol=1e-9)
    assert offset_variance_share(a) > 0.95
    assert np.allclose(np.diag(residual), 0.0) and abs(residual[off].mean()) < 1e-9
    # clustering by the raw matrix follows the levels; by the residual, the blocks
    raw = cluster(a, 3, method="fast", seed=0).labels
    centered = cluster(residual, 3, method="fast", seed=0).labels
    assert adjusted_rand_index(centered, blocks) == 1.0
    assert adjusted_rand_index(raw, blocks) < 0.5
    assert offset_variance_share(pairs * off) < 0.05  # balanced blocks: no main effects to explain
