"""Grouping tasks from a symmetric affinity matrix T (n x n, higher = "j helps i more").

A partition into m groups with 0/1 indicators v_c has average within-cluster density
(1/m) sum_c v_c' T v_c / v_c' v_c. Its matrix Z = sum_c v_c v_c' / |c| is symmetric, PSD,
entrywise nonnegative, has Z 1 = 1 and trace m, and <T, Z> = sum_c v_c' T v_c / |c|. Dropping
"Z comes from a partition" leaves a semidefinite program (docs/METHOD.md section 4):

    max <T, Z>  (+ trace_penalty * trace(Z) when m is free)
    s.t. Z 1 = 1, Z >= 0, Z PSD, trace(Z) = m.

Two solvers, one rounding:
- ``sdp_relaxation``: the exact SDP through cvxpy (SCS or Clarabel). Simple and certain,
  but it has n^2 variables and an n x n cone: 30-80 s at n = 500 with SCS (benchmark).
- ``fast_relaxation``: a Burer-Monteiro factorization Z = V V' with V >= 0 (n x k, k = 2m + 2),
  solved by an augmented Lagrangian with L-BFGS inner steps in torch. V >= 0 makes Z >= 0
  and Z PSD hold by construction, and trace(Z) = ||V||_F^2 = m is built into the
  parametrization, so only Z 1 = 1 remains as a constraint. Every step costs two n x n by
  n x k products: about 1 s at n = 500, 30x faster than SCS at the same <T, Z>
  (``experiments/clustering_benchmark.py``).
  Caveat: V >= 0 restricts Z to completely positive matrices. They contain every partition
  matrix, so where the SDP's optimum is a partition (groups it recovers) both solvers reach
  the same <T, Z>; where T is so noisy that the SDP optimum is fractional, the fast solver's
  <T, Z> stays below SCS's (2.0% at n = 500 with noise 1.5 in ``planted_affinity``, 1.6-3.9%
  at n = 60-200 with noise 1-2), while its rounded groups match the planted ones about as
  well or better (adjusted Rand index 0.93 vs 0.83 at n = 500; 0.81 vs 0.72, 0.53 vs 0.42,
  0.24 vs 0.15, 0.21 vs 0.25 at the smaller sizes). The factorization is also non-convex: a
  run can stop at a worse stationary point than another seed's.
- ``round_partition``: u and v share a group when Z_uv >= c/n, resolved greedily into a
  partition (see its docstring).

The number of groups is chosen by ``choose_num_groups``; partitions are scored in
``elora_fed.grouping.partitions``, and ``elora_fed.grouping.spectral`` is the baseline the SDP is compared against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cvxpy as cp
import numpy as np
import torch

from elora_fed.errors import ConfigError, EloraFedError
from elora_fed.grouping.partitions import (
    average_density,
    canonical_labels,
    check_affinity,
    check_num_groups,
    excess_density,
)
from elora_fed.grouping.spectral import spectral_clustering
from elora_fed.threads import single_torch_thread

if TYPE_CHECKING:
    from elora_fed.grouping.config import ClusteringConfig

SDP_SOLVERS = ("SCS", "CLARABEL")
METHODS = ("fast", "sdp")


class RelaxationError(EloraFedError):
    """The relaxation's solver failed or returned no solution."""


@dataclass(frozen=True, eq=False)
class Clustering:
    """A rounded partition of the tasks and how it was found.

    ``m`` is the number of groups of the rounded partition (rounding may, on ambiguous
    relaxations, return a different number than the m the relaxation was solved for).
    ``objective`` is its average within-cluster density on T; ``relaxation_objective`` is
    <T, Z> of the relaxation (an upper bound on m * density when the SDP is solved exactly).
    """

    labels: np.ndarray
    m: int
    objective: float
    relaxation_objective: float
    seconds: float
    solver: str


@dataclass(frozen=True, eq=False)
class GroupChoice:
    """The chosen clustering, and the score (excess density, see ``choose_num_groups``) of each candidate m."""

    clustering: Clustering
    scores: dict[int, float]


def sdp_relaxation(
    T: np.ndarray, m: int | None = None, trace_penalty: float | None = None, solver: str = "SCS"
) -> np.ndarray:
    """Z solving the SDP relaxation with cvxpy: trace(Z) = m, or + trace_penalty * trace(Z) in the objective.

    Exactly one of ``m`` and ``trace_penalty`` is given. ``solver`` is "SCS" (first-order,
    default tolerances) or "CLARABEL" (interior point: more accurate, more memory).
    """
    T = check_affinity(T)
    n = len(T)
    if (m is None) == (trace_penalty is None):
        raise ConfigError("give exactly one of m (a fixed number of groups) and trace_penalty")
    if solver not in SDP_SOLVERS:
        raise ConfigError(f"unknown SDP solver {solver!r}: use one of {', '.join(SDP_SOLVERS)}")
    if solver not in cp.installed_solvers():
        raise ConfigError(f"the SDP solver {solver} is not installed (pip install {solver.lower()})")
    Z = cp.Variable((n, n), PSD=True)
    objective = cp.sum(cp.multiply(T, Z))
    constraints = [cp.sum(Z, axis=1) == 1, Z >= 0]
    if m is not None:
        check_num_groups(m, n)
        constraints.append(cp.trace(Z) == m)
    elif trace_penalty is not None:
        objective = objective + trace_penalty * cp.trace(Z)
    problem = cp.Problem(cp.Maximize(objective), constraints)
    try:
        problem.solve(solver=solver)
    except cp.SolverError as error:
        raise RelaxationError(f"the SDP solver {solver} failed on n = {n}: {error}") from error
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or Z.value is None:
        raise RelaxationError(f"the SDP solver {solver} returned status {problem.status!r} on n = {n}")
    value = np.asarray(Z.value)
    return (value + value.T) / 2


def _sinkhorn_rows(V: torch.Tensor, iterations: int = 200, tol: float = 1e-12) -> torch.Tensor:
    """diag(d) V with d > 0 such that (diag(d) V)(diag(d) V)' 1 = 1: symmetric Sinkhorn scaling of Z = V V'."""
    d = torch.ones(len(V), dtype=V.dtype)
    for _ in range(iterations):
        row_sums = d * (V @ (V.T @ d))
        if (row_sums - 1).abs().max().item() < tol:
            break
        d = d / row_sums.clamp_min(1e-300).sqrt()
    return d[:, None] * V


def fast_relaxation(
    T: np.ndarray,
    m: int,
    rank: int | None = None,
    seed: int = 0,
    tol: float = 1e-5,
    max_outer: int = 50,
    inner_iterations: int = 100,
) -> np.ndarray:
    """Z = V V' (n x n) for the fixed-m relaxation, from a nonnegative low-rank factor V (n x rank).

    V = sqrt(m) W / ||W||_F with W = U * U (entrywise), so V >= 0 and trace(Z) = m hold by
    construction and Z >= 0, Z PSD follow. The row sums V V' 1 = 1 are an augmented
    Lagrangian constraint (multipliers y, penalty rho, raised 4x whenever the violation falls
    by less than 4x); each subproblem is up to ``inner_iterations`` steps of L-BFGS (strong
    Wolfe line search) in U, in float64 torch on one CPU thread. It stops when
    max |Z 1 - 1| < ``tol`` or after ``max_outer`` rounds; a symmetric Sinkhorn scaling of the
    rows of V then makes the row sums exact (moving the trace by about ``tol``).

    T is centered and scaled first, which changes <T, Z> by an affine map on the feasible set
    only. ``rank`` defaults to 2m + 2, capped at n: slack over m lets the factor escape poor
    stationary points. ``seed`` draws the random start. Returns the full Z, so it rounds and
    scores exactly like ``sdp_relaxation``'s.
    """
    T = check_affinity(T)
    n = len(T)
    check_num_groups(m, n)
    k = min(n, 2 * m + 2) if rank is None else rank
    if not m <= k <= n:
        raise ConfigError(f"rank must be between m = {m} and n = {n}, got {k}")
    centered = T - T.mean()
    A = torch.from_numpy(centered / max(float(np.abs(centered).max()), 1e-300))
    ones = torch.ones(n, dtype=torch.float64)
    y, rho = torch.zeros(n, dtype=torch.float64), 1.0
    with single_torch_thread():  # see its docstring: scipy's threaded L-BFGS-B took 50 s, not 0.9 s, here
        start = _sinkhorn_rows(torch.from_numpy(np.random.default_rng(seed).uniform(size=(n, k))))
        U = start.sqrt()
        optimizer = torch.optim.LBFGS(
            [U],
            lr=1,
            max_iter=inner_iterations,
            history_size=10,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-5,
            tolerance_change=1e-10,
        )

        def factor() -> tuple[torch.Tensor, torch.Tensor]:
            """V from U, and W = U * U."""
            W = U * U
            return W * (m / (W * W).sum()).sqrt(), W

        def lagrangian() -> float:
            """-<A, V V'> - y'r + rho/2 |r|^2 with r = V V' 1 - 1; its gradient in U goes to U.grad."""
            V, W = factor()
            AV = A @ V
            s = V.sum(0)
            r = V @ s - ones
            y_hat = y - rho * r
            grad_V = -2 * AV - torch.outer(y_hat, s) - (y_hat @ V)[None, :]
            # through V = sqrt(m) W / ||W||: drop the radial component and scale; then W = U * U
            grad_W = (grad_V - (grad_V * V).sum() / m * V) * (V.norm() / W.norm())
            U.grad = 2 * U * grad_W
            return float(-(V * AV).sum() - y @ r + rho / 2 * (r @ r))

        violation = np.inf
        for _ in range(max_outer):
            optimizer.step(lagrangian)
            V, _ = factor()
            r = V @ V.sum(0) - ones
            y = y - rho * r
            new_violation = r.abs().max().item()
            if new_violation < tol:
                break
            if new_violation > 0.25 * violation:
                rho *= 4
            violation = new_violation
        V = _sinkhorn_rows(factor()[0])
        return (V @ V.T).numpy()


def round_partition(Z: np.ndarray, c: float = 1.0) -> np.ndarray:
    """Group labels 0..m-1 (ordered by smallest member index) from a relaxation's Z.

    u and v are neighbors when Z_uv >= c/n (c >= 1). Thresholded neighborhoods of an inexact
    Z can overlap without being equal, so they are resolved greedily: among the unassigned
    tasks, the one whose unassigned neighbors carry the most mass sum_v Z_uv (ties: the
    smallest index) opens a group with itself and all its unassigned neighbors; repeat until
    every task is assigned. Each group is non-empty (it contains its opener), every task
    lands in exactly one, and the result depends on Z alone. For an exact partition matrix
    (Z_uv = 1/|c| within a group, 0 across) this returns that partition.
    """
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2 or Z.shape[0] != Z.shape[1] or Z.shape[0] == 0:
        raise ConfigError(f"Z must be a square non-empty matrix, got shape {Z.shape}")
    if not np.isfinite(Z).all():
        raise ConfigError("Z contains NaN or infinite entries")
    if not c >= 1:
        raise ConfigError(f"the rounding constant c must be >= 1, got {c}")
    n = len(Z)
    neighbors = np.greater_equal(Z, c / n)
    labels = np.full(n, -1, dtype=np.int64)
    unassigned = np.ones(n, dtype=bool)
    group = 0
    while unassigned.any():
        open_neighbors = neighbors & unassigned[None, :]
        mass = np.where(open_neighbors, Z, 0.0).sum(1)
        mass[~unassigned] = -np.inf
        opener = int(np.argmax(mass))
        members = open_neighbors[opener].copy()
        members[opener] = True
        labels[members] = group
        unassigned &= ~members
        group += 1
    return canonical_labels(labels)


def cluster(
    T: np.ndarray,
    m: int | None = None,
    method: str = "fast",
    *,
    trace_penalty: float | None = None,
    solver: str = "SCS",
    c: float = 1.0,
    rank: int | None = None,
    tol: float = 1e-5,
    seed: int = 0,
) -> Clustering:
    """Solve a relaxation and round it to a partition.

    ``method="fast"``: ``fast_relaxation`` (fixed m only). ``method="sdp"``: ``sdp_relaxation``
    with ``solver``, for a fixed m or a ``trace_penalty``. With neither m nor a trace penalty,
    m is chosen by ``choose_num_groups`` with the same method. m = 1 runs no solver (the only
    feasible Z is 11'/n). ``rank``, ``tol`` and ``seed`` go to ``fast_relaxation``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown clustering method {method!r}: use one of {', '.join(METHODS)}")
    T = check_affinity(T)
    if method == "fast" and trace_penalty is not None:
        raise ConfigError("the fast solver needs a fixed m; a trace_penalty needs method='sdp'")
    if m is not None and trace_penalty is not None:
        raise ConfigError("give exactly one of m (a fixed number of groups) and trace_penalty")
    if m is None and trace_penalty is None:
        return choose_num_groups(T, method=method, solver=solver, c=c, seed=seed).clustering
    start = time.perf_counter()
    if m == 1:
        Z = np.full(T.shape, 1 / len(T))  # the only feasible Z: Z 1 = 1, PSD and trace 1 force 11'/n
    elif method == "fast":
        assert m is not None  # checked above: fast needs m, sdp accepts either
        Z = fast_relaxation(T, m, rank=rank, seed=seed, tol=tol)
    else:
        Z = sdp_relaxation(T, m=m, trace_penalty=trace_penalty, solver=solver)
    labels = round_partition(Z, c)
    return Clustering(
        labels=labels,
        m=int(labels.max()) + 1,
        objective=average_density(T, labels),
        relaxation_objective=float((T * Z).sum()),
        seconds=time.perf_counter() - start,
        solver="fast" if method == "fast" else solver,
    )


def choose_num_groups(
    T: np.ndarray,
    candidates: Sequence[int] | None = None,
    *,
    method: str = "fast",
    solver: str = "SCS",
    c: float = 1.0,
    seed: int = 0,
) -> GroupChoice:
    """Cluster for every candidate m and keep the partition of highest ``excess_density``.

    Why not the raw average density: adding a constant a to every entry of T leaves the
    relaxation's solution unchanged (Z 1 = 1 makes <11', Z> = n) but adds a n / m to the
    density, so the raw density favors m = 2 whenever T's typical entry is positive (and the
    largest m when negative), and an affinity such as "gain over the single-task loss" has
    no canonical zero. Subtracting what random groups of the same sizes would score makes
    the choice invariant to shifting and scaling T, and measures how much more the chosen
    groups' members help each other than a random grouping would: merging two planted groups
    adds low cross-group pairs, splitting one leaves the sum over groups as it was but
    divides it by more groups, so the score peaks at the planted m.

    ``candidates`` default to 2..min(n, 20) (1 for a single task); ties go to the smallest m. The fast solver runs
    with row-sum tolerance 1e-3 here (rounding compares entries with c/n, so this is enough
    and about a third faster); re-solve the chosen m with ``cluster`` for a tighter Z. A candidate's
    rounded partition may have another number of groups than the candidate: the chosen
    ``clustering.m`` is the number of groups actually found.
    """
    T = check_affinity(T)
    n = len(T)
    candidates = list(range(min(2, n), min(n, 20) + 1)) if candidates is None else sorted(set(candidates))
    if not candidates:
        raise ConfigError(f"no candidate number of groups: n = {n} tasks need candidates between 1 and n")
    for m in candidates:
        check_num_groups(m, n)
    scores: dict[int, float] = {}
    clusterings: dict[int, Clustering] = {}
    for m in candidates:
        clusterings[m] = cluster(T, m, method, solver=solver, c=c, tol=1e-3, seed=seed)
        scores[m] = excess_density(T, clusterings[m].labels)
    best = max(candidates, key=lambda m: (scores[m], -m))  # ties: the smallest m
    return GroupChoice(clustering=clusterings[best], scores=scores)


def cluster_clients(T: np.ndarray, config: ClusteringConfig, seed: int) -> np.ndarray:
    """Group labels for ``clustering.*``: the SDP clustering (or the spectral baseline), m capped at n.

    One client (or none) is one group; ``num_groups = 0`` chooses m (``choose_num_groups``).
    """
    n = len(T)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    if config.method == "spectral":
        return spectral_clustering(T, min(config.num_groups, n), seed=seed)
    m = min(config.num_groups, n) or None
    return cluster(T, m, method=config.method, solver=config.solver, seed=seed).labels


def groups_record(client_ids: Sequence[str], labels: np.ndarray) -> dict[str, list[Any]]:
    """``groups.json``'s common part: the clients, their labels, and each group's members in client order."""
    labels = np.asarray(labels)
    groups = [[client_ids[int(i)] for i in np.flatnonzero(labels == g)] for g in np.unique(labels)]
    return {"clients": list(client_ids), "labels": labels.tolist(), "groups": groups}
