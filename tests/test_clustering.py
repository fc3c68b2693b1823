import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from elora_fed.errors import ConfigError
from elora_fed.grouping.clustering import (
    GroupChoice,
    choose_num_groups,
    cluster,
    fast_relaxation,
    round_partition,
    sdp_relaxation,
)
from elora_fed.grouping.partitions import (
    adjusted_rand_index,
    average_density,
    canonical_labels,
    excess_density,
    planted_affinity,
)
from elora_fed.grouping.spectral import spectral_clustering


def partition_matrix(labels: np.ndarray) -> np.ndarray:
    """Z = sum_c v_c v_c' / |c|: the relaxation's matrix of a partition."""
    same = labels[:, None] == labels[None, :]
    return same / same.sum(1, keepdims=True)


def assert_valid_partition(labels: np.ndarray, n: int) -> None:
    assert labels.shape == (n,) and labels.dtype.kind == "i"
    groups = labels.max() + 1
    assert set(labels.tolist()) == set(range(groups))  # every label 0..m-1 used: groups non-empty
    _, first = np.unique(labels, return_index=True)
    assert (np.diff(first) > 0).all()  # ordered by smallest member index


def test_adjusted_rand_index():
    assert adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])) == 1.0
    assert adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])) == pytest.approx(4 / 7)
    assert adjusted_rand_index(np.zeros(4), np.arange(4)) == 0.0
    assert adjusted_rand_index(np.zeros(4), np.zeros(4)) == 1.0
    rng = np.random.default_rng(0)
    assert abs(adjusted_rand_index(rng.integers(5, size=2000), rng.integers(5, size=2000))) < 0.01


def test_average_and_excess_density():
    T = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = np.array([0, 0, 1])
    assert average_density(T, labels) == pytest.approx(((1 + 2 + 2 + 1) / 2 + 3) / 2)
    assert excess_density(T, np.zeros(3, dtype=int)) == pytest.approx(0.0)  # both trivial partitions score 0
    assert excess_density(T, np.arange(3)) == pytest.approx(0.0)
    assert excess_density(T, labels) > 0
    # invariant to shifting T, scaled with it
    assert excess_density(2 * T + 7, labels) == pytest.approx(2 * excess_density(T, labels))


@pytest.mark.parametrize("solver", ["SCS", "CLARABEL"])
def test_sdp_recovers_planted_groups(solver):
    T, planted = planted_affinity(30, 3, noise=0.3, seed=0)
    Z = sdp_relaxation(T, m=3, solver=solver)
    assert np.trace(Z) == pytest.approx(3, abs=1e-3)
    np.testing.assert_allclose(Z.sum(1), 1, atol=1e-3)
    assert adjusted_rand_index(planted, round_partition(Z)) == 1.0
    result = cluster(T, 3, method="sdp", solver=solver)
    assert result.m == 3 and result.solver == solver
    assert adjusted_rand_index(planted, result.labels) == 1.0
    assert result.objective == pytest.approx(average_density(T, planted))
    assert result.relaxation_objective == pytest.approx(3 * result.objective, rel=1e-3)  # the SDP is tight here


def test_sdp_with_trace_penalty_finds_the_number_of_groups():
    T, planted = planted_affinity(30, 3, noise=0.3, seed=0)
    result = cluster(T, method="sdp", trace_penalty=-5.0)  # merging two groups costs ~10, splitting 5
    assert result.m == 3 and adjusted_rand_index(planted, result.labels) == 1.0


@pytest.mark.parametrize(("n", "m"), [(100, 5), (200, 8)])
def test_fast_solver_recovers_planted_groups(n, m):
    T, planted = planted_affinity(n, m, noise=0.5, seed=1)
    Z = fast_relaxation(T, m)
    np.testing.assert_allclose(Z.sum(1), 1, atol=1e-9)
    assert np.trace(Z) == pytest.approx(m, rel=1e-4)
    assert Z.min() >= 0 and np.linalg.eigvalsh(Z).min() > -1e-9
    result = cluster(T, m)
    assert result.m == m and result.solver == "fast"
    assert adjusted_rand_index(planted, result.labels) == 1.0


def test_fast_solver_reaches_the_sdp_objective():
    T, _ = planted_affinity(60, 4, noise=1.0, seed=1)  # noisy enough that the SDP is not a partition
    scs = float((T * sdp_relaxation(T, m=4)).sum())
    fast = float((T * fast_relaxation(T, 4)).sum())
    assert abs(fast - scs) / abs(scs) < 0.01


def test_rounding_recovers_exact_partitions_and_is_deterministic():
    labels = canonical_labels(np.random.default_rng(0).integers(4, size=25))
    Z = partition_matrix(labels)
    np.testing.assert_array_equal(round_partition(Z), labels)
    np.testing.assert_array_equal(round_partition(Z, c=2.0), labels)
    np.testing.assert_array_equal(round_partition(np.eye(5)), np.arange(5))
    np.testing.assert_array_equal(round_partition(np.full((5, 5), 0.2)), np.zeros(5))


@settings(max_examples=60, deadline=None)
@given(
    V=st.tuples(st.integers(1, 12), st.integers(1, 6)).flatmap(
        lambda shape: arrays(np.float64, shape, elements=st.floats(0, 1))
    ),
    c=st.floats(1.0, 4.0),
)
def test_rounding_always_returns_a_valid_partition(V, c):
    Z = V @ V.T  # PSD and nonnegative, rows summing to anything (an inexact relaxation)
    labels = round_partition(Z, c)
    assert_valid_partition(labels, len(Z))
    np.testing.assert_array_equal(round_partition(Z, c), labels)


@settings(max_examples=30, deadline=None)
@given(Z=st.integers(1, 10).flatmap(lambda n: arrays(np.float64, (n, n), elements=st.floats(-1, 1))))
def test_rounding_of_arbitrary_matrices_is_a_valid_partition(Z):
    assert_valid_partition(round_partition(Z), len(Z))


def test_choose_num_groups_recovers_the_planted_number():
    T, planted = planted_affinity(120, 5, noise=0.5, seed=2)
    choice = choose_num_groups(T, candidates=range(2, 11))
    assert isinstance(choice, GroupChoice) and sorted(choice.scores) == list(range(2, 11))
    assert choice.clustering.m == 5 and adjusted_rand_index(planted, choice.clustering.labels) == 1.0
    # invariant to shifting and scaling T, which the raw density is not
    assert choose_num_groups(3 * T + 5, candidates=range(2, 11)).clustering.m == 5
    assert cluster(T).m == 5  # no m: chosen


def test_one_group_and_one_task():
    T, _ = planted_affinity(8, 2, noise=0.1)
    for method in ("fast", "sdp"):
        result = cluster(T, 1, method=method)
        assert result.m == 1 and (result.labels == 0).all()
    assert choose_num_groups(T, candidates=[1, 2, 3]).clustering.m == 2
    single, _ = planted_affinity(1, 1, noise=0.1)
    assert cluster(single).m == 1 and fast_relaxation(single, 1) == pytest.approx(np.ones((1, 1)))
    assert adjusted_rand_index(np.array([0]), np.array([5])) == 1.0


def test_spectral_baseline_recovers_planted_groups():
    T, planted = planted_affinity(100, 5, noise=0.5, seed=3)
    labels = spectral_clustering(T, 5)
    assert adjusted_rand_index(planted, labels) == 1.0
    assert_valid_partition(labels, 100)
    np.testing.assert_array_equal(spectral_clustering(T, 5), labels)


def test_bad_input_is_refused():
    T, _ = planted_affinity(10, 2, noise=0.1)
    with pytest.raises(ConfigError, match="square"):
        fast_relaxation(np.ones((3, 4)), 2)
    with pytest.raises(ConfigError, match="symmetric"):
        cluster(np.triu(T) + 1, 2)
    nan = T.copy()
    nan[1, 2] = nan[2, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        sdp_relaxation(nan, m=2)
    with pytest.raises(ConfigError, match="between 1 and the number of tasks"):
        fast_relaxation(T, 11)
    with pytest.raises(ConfigError, match="between 1 and the number of tasks"):
        sdp_relaxation(T, m=0)
    with pytest.raises(ConfigError, match="unknown SDP solver"):
        sdp_relaxation(T, m=2, solver="MOSEK")
    with pytest.raises(ConfigError, match="exactly one"):
        sdp_relaxation(T, m=2, trace_penalty=1.0)
    with pytest.raises(ConfigError, match="unknown clustering method"):
        cluster(T, 2, method="kmeans")
    with pytest.raises(ConfigError, match="exactly one"):
        cluster(T, 2, method="sdp", trace_penalty=1.0)
    with pytest.raises(ConfigError, match="method='sdp'"):
        cluster(T, 2, trace_penalty=1.0)
    with pytest.raises(ConfigError, match="rank"):
        fast_relaxation(T, 3, rank=2)
    with pytest.raises(ConfigError, match="c must be >= 1"):
        round_partition(np.eye(3), c=0.5)
    with pytest.raises(ConfigError, match="between 1 and the number of tasks"):
        choose_num_groups(T, candidates=[2, 12])
    with pytest.raises(ConfigError, match="one entry per task"):
        average_density(T, np.zeros(3))
