"""Calibration of the surrogate's L2 strength lam against real fine-tuning runs (docs/METHOD.md §3).

lam is the surrogate's only free parameter: ``calibrate_lambda`` picks it from a grid as
the value whose estimates (``elora_fed.surrogate.subset_solver``, exact or private mode) best
reproduce real runs' validation losses; ``calibration_errors`` gives the error per value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from elora_fed.errors import ConfigError
from elora_fed.surrogate.quadratic_sums import solve_subsets_private
from elora_fed.surrogate.statistics import client_statistics
from elora_fed.surrogate.subset_solver import solve_subsets

if TYPE_CHECKING:
    from elora_fed.surrogate.task_features import TaskFeatures


def calibration_errors(
    tasks: Sequence[TaskFeatures],
    calibration: Sequence[tuple[Sequence[int], np.ndarray]],
    grid: Sequence[float],
    *,
    private: bool = False,
) -> np.ndarray:
    """Mean relative error |f^_i(S) - f_i(S)| / f_i(S) over every member of every calibration item, per lam in grid."""
    if not calibration or not grid:
        raise ConfigError("lambda calibration needs at least one real fine-tuning run and one grid value")
    subsets = [tuple(s) for s, _ in calibration]
    real = [np.asarray(r, dtype=np.float64) for _, r in calibration]
    for s, r in zip(subsets, real, strict=True):
        if r.shape != (len(s),):
            raise ConfigError(f"calibration subset {s} has {len(s)} members but {r.shape} real losses")
    stats = [client_statistics(t) for t in tasks] if private else []
    errors = []
    for lam in grid:
        est = solve_subsets_private(stats, subsets, lam) if private else solve_subsets(tasks, subsets, lam)
        errors.append(np.mean(np.concatenate([np.abs(est.losses[k, : len(r)] - r) / r for k, r in enumerate(real)])))
    return np.asarray(errors)


def calibrate_lambda(
    tasks: Sequence[TaskFeatures],
    calibration: Sequence[tuple[Sequence[int], np.ndarray]],
    grid: Sequence[float],
    *,
    private: bool = False,
) -> float:
    """The lam in ``grid`` whose surrogate best reproduces real fine-tuning runs.

    Procedure: fine-tune real adapters on one to three subsets S (for instance all tasks, or
    a random group) and record every member's real validation loss f_i(S) afterwards; pass
    them as ``calibration = [(S, [f_i(S) for i in S]), ...]``. For each lam in ``grid`` (a
    log-spaced grid such as 10^-5 .. 10^0) the surrogate is solved on the same subsets, and
    the lam with the smallest mean relative error |f^_i(S) - f_i(S)| / f_i(S), pooled over
    all members of all runs, is returned (the first one on ties). lam is the only free
    parameter: it sets how far the surrogate moves from the base model, so it is calibrated
    once and then used for every subset; report it with the results, together with
    ``calibration_errors`` over the grid. Calibrate with the same mode (``private``) that
    the affinity will use: the quadratic surrogate can prefer a different lam.
    """
    errors = calibration_errors(tasks, calibration, grid, private=private)
    return float(grid[int(np.argmin(errors))])
