from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
from scipy.stats import spearmanr

from elora_fed.errors import ConfigError, DataError
from elora_fed.sketch.client_sketch import ClientSketch, SketchMetadata
from elora_fed.surrogate.affinity import sample_subsets, task_affinity
from elora_fed.surrogate.lambda_calibration import calibrate_lambda, calibration_errors
from elora_fed.surrogate.quadratic_sums import solve_subsets_private
from elora_fed.surrogate.statistics import client_statistics
from elora_fed.surrogate.subset_solver import solve_subsets
from elora_fed.surrogate.task_features import TaskFeatures, task_features


def make_tasks(n: int, d: int, scale: float, seed: int = 0, offset: float = -2.0) -> list[TaskFeatures]:
    rng = np.random.default_rng(seed)

    def rows(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.tensor(rng.normal(offset, 1.0, count), dtype=torch.float32)
        return b, torch.tensor(rng.normal(0.0, scale, (count, d)), dtype=torch.float32)

    return [TaskFeatures(f"c{i}", *rows(int(rng.integers(3, 15))), *rows(int(rng.integers(2, 6)))) for i in range(n)]


def stacked(tasks: list[TaskFeatures], subset: tuple[int, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    b = np.concatenate([getattr(tasks[i], f"{split}_outputs").double().numpy() for i in subset])
    g = np.concatenate([getattr(tasks[i], f"{split}_features").double().numpy() for i in subset])
    return b, g


def reference(tasks: list[TaskFeatures], subset: tuple[int, ...], lam: float) -> tuple[np.ndarray, list[float]]:
    """w_S by scipy's L-BFGS in float64, and every member's validation loss under it."""
    b, g = stacked(tasks, subset, "train")

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = b + g @ w
        value = np.mean(np.logaddexp(0.0, -z)) + lam / 2 * w @ w
        return value, -(g.T @ (1 / (1 + np.exp(z)))) / len(b) + lam * w

    w = scipy.optimize.minimize(
        objective,
        np.zeros(g.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-13, "ftol": 0, "maxiter": 5000},
    ).x
    losses = []
    for i in subset:
        bv, gv = stacked(tasks, (i,), "val")
        losses.append(float(np.mean(np.logaddexp(0.0, -(bv + gv @ w)))))
    return w, losses


SUBSETS = [(0,), (1, 2), (0, 3, 5), (2, 4), (0, 1, 2, 3, 4, 5), (5,), (1, 4, 5)]


@pytest.mark.parametrize("lam, scale", [(0.01, 0.5), (1e-4, 1.0)])
def test_batched_newton_matches_scipy(lam, scale):
    tasks = make_tasks(6, 12, scale)
    est = solve_subsets(tasks, SUBSETS, lam, tol=1e-10, chunk_size=3, dtype=torch.float64)
    assert est.subsets == tuple(SUBSETS) and est.w.shape == (len(SUBSETS), 12)
    assert (est.grad_norm <= 1e-10).all() and (est.iterations >= 1).all()
    for k, subset in enumerate(SUBSETS):
        w, losses = reference(tasks, subset, lam)
        np.testing.assert_allclose(est.w[k].numpy(), w, atol=1e-6 * max(1.0, np.abs(w).max()))
        np.testing.assert_allclose(est.losses[k, : len(subset)], losses, rtol=1e-7)
        assert np.isnan(est.losses[k, len(subset) :]).all()
        assert est.member_losses(k) == pytest.approx(dict(zip(subset, losses, strict=True)), rel=1e-7)


def test_float32_and_chunking_agree_with_float64():
    tasks = make_tasks(6, 12, 0.5)
    exact = solve_subsets(tasks, SUBSETS, 0.01, tol=1e-12, dtype=torch.float64, chunk_size=100)
    fast = solve_subsets(tasks, SUBSETS, 0.01, chunk_size=1)
    assert fast.w.dtype == torch.float32 and (fast.grad_norm <= 1e-6).all()
    np.testing.assert_allclose(fast.losses, exact.losses, rtol=1e-5)
    np.testing.assert_allclose(fast.w.numpy(), exact.w.numpy(), atol=1e-4)


def test_float32_stops_at_its_rounding_floor_instead_of_spinning():
    tasks = make_tasks(6, 12, 50.0)
    fast = solve_subsets(tasks, SUBSETS, 1.0, tol=1e-12, max_iter=50)
    exact = solve_subsets(tasks, SUBSETS, 1.0, tol=1e-12, dtype=torch.float64)
    assert fast.iterations.max() < 25 and (exact.grad_norm <= 1e-12).all()
    np.testing.assert_allclose(fast.losses, exact.losses, rtol=1e-4)


def test_solving_restores_the_thread_count():
    before = torch.get_num_threads()
    solve_subsets(make_tasks(3, 4, 0.5), [(0, 1), (2,)], 0.1)
    assert torch.get_num_threads() == before


@pytest.mark.e2e
def test_the_solver_imports_without_the_model_stack():
    """Solving, the statistics and the lambda calibration need no peft or transformers (only ``task_features`` does)."""
    code = (
        "import elora_fed.surrogate.subset_solver, elora_fed.surrogate.quadratic_sums, elora_fed.surrogate.statistics, elora_fed.surrogate.lambda_calibration, sys; "
        "assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_private_mode_is_the_quadratic_surrogate_solved_directly():
    tasks = make_tasks(6, 10, 0.5)
    stats = [client_statistics(t, dtype=torch.float64) for t in tasks]
    lam = 0.05
    est = solve_subsets_private(stats, SUBSETS, lam, dtype=torch.float64, chunk_size=2)
    assert (est.iterations == 1).all() and (est.grad_norm < 1e-12).all()
    for k, subset in enumerate(SUBSETS):
        b, g = stacked(tasks, subset, "train")
        p = 1 / (1 + np.exp(b))  # -loss'(b)
        hessian = g.T @ (g * (p * (1 - p))[:, None]) / len(b) + lam * np.eye(g.shape[1])
        w = np.linalg.solve(hessian, g.T @ p / len(b))
        np.testing.assert_allclose(est.w[k].numpy(), w, rtol=1e-9, atol=1e-12)
        for j, i in enumerate(subset):
            bv, gv = stacked(tasks, (i,), "val")
            pv = 1 / (1 + np.exp(bv))
            expected = np.mean(np.logaddexp(0, -bv) - pv * (gv @ w) + 0.5 * pv * (1 - pv) * (gv @ w) ** 2)
            assert est.losses[k, j] == pytest.approx(expected, rel=1e-9)


def test_private_mode_matches_exact_mode_when_moves_are_small():
    tasks = make_tasks(8, 16, 0.02)
    subsets = sample_subsets(8, 3, 20, seed=1)
    singles = [(i,) for i in range(8)]
    stats = [client_statistics(t) for t in tasks]
    lam = 0.01
    exact = solve_subsets(tasks, subsets, lam, dtype=torch.float64, tol=1e-12)
    private = solve_subsets_private(stats, subsets, lam, dtype=torch.float64)
    np.testing.assert_allclose(private.w.numpy(), exact.w.numpy(), rtol=0.02, atol=0.02 * exact.w.abs().max().item())
    t_exact = task_affinity(exact, solve_subsets(tasks, singles, lam).losses[:, 0], 8)
    t_private = task_affinity(private, solve_subsets_private(stats, singles, lam).losses[:, 0], 8)
    upper = np.triu_indices(8, 1)
    assert spearmanr(t_exact[upper], t_private[upper]).statistic > 0.95


def test_statistics_are_additive():
    a, b = make_tasks(2, 5, 0.5, seed=3)
    union = TaskFeatures(
        "a+b",
        torch.cat([a.train_outputs, b.train_outputs]),
        torch.cat([a.train_features, b.train_features]),
        torch.cat([a.val_outputs, b.val_outputs]),
        torch.cat([a.val_features, b.val_features]),
    )
    whole = client_statistics(union, dtype=torch.float64)
    summed = client_statistics(a, dtype=torch.float64) + client_statistics(b, dtype=torch.float64)
    for split in ("train", "validation"):
        for field in dataclasses.fields(whole.train):
            left, right = getattr(getattr(whole, split), field.name), getattr(getattr(summed, split), field.name)
            torch.testing.assert_close(left, right, rtol=1e-12, atol=1e-12)
    assert whole.train.count.item() == len(union.train_outputs) and whole.dim == 5
    assert client_statistics(a).train.curv.dtype == torch.float32  # what a client sends by default


def test_task_features_from_a_sketch():
    meta = SketchMetadata("m", "fp32", 4, "q_proj,v_proj", 0, "rademacher", 0, 3, 10, "lm")
    features = np.arange(15, dtype=np.float32).reshape(5, 3)
    sketch = ClientSketch(
        client_id="c",
        split=np.array([1, 0, 0, 2, 1], dtype=np.int8),
        sample_index=np.array([0, 1, 0, 0, 1], dtype=np.int32),
        outputs=np.arange(5, dtype=np.float32),
        features=features,
        labels=np.full(5, -1, dtype=np.int32),
        metadata=meta,
    )
    task = task_features(sketch)
    assert task.client_id == "c" and task.dim == 3 and task.train_outputs.dtype == torch.float32
    assert task.train_outputs.tolist() == [2.0, 1.0] and task.val_outputs.tolist() == [0.0, 4.0]
    assert task.val_features.tolist() == [features[0].tolist(), features[4].tolist()]


def early_stopped_losses(tasks: list[TaskFeatures], subset: tuple[int, ...], steps: int, lr: float) -> np.ndarray:
    """Real fine-tuning that shares nothing with the solver: gradient descent on the unregularized loss, stopped early.

    Early stopping regularizes like an L2 term of strength about 1 / (lr * steps), so the
    calibrated lam should track that, falling as the real runs train longer.
    """
    b, g = stacked(tasks, subset, "train")
    w = np.zeros(g.shape[1])
    for _ in range(steps):
        w += lr * (g.T @ (1 / (1 + np.exp(b + g @ w)))) / len(b)
    return np.array(
        [np.mean(np.logaddexp(0.0, -(bv + gv @ w))) for bv, gv in (stacked(tasks, (i,), "val") for i in subset)]
    )


@pytest.mark.parametrize("private", [False, True])
def test_calibration_finds_the_regularization_of_real_early_stopped_runs(private):
    tasks = make_tasks(8, 6, 1.0, seed=3)
    runs = [(0, 1, 2, 3, 4, 5, 6, 7), (1, 3, 5), (0, 2, 4, 6)]
    grid = list(10.0 ** np.arange(-4, 1.01, 0.5))
    chosen = []
    for steps in (3, 30):
        calibration = [(s, early_stopped_losses(tasks, s, steps, lr=0.5)) for s in runs]
        lam = calibrate_lambda(tasks, calibration, grid, private=private)
        errors = calibration_errors(tasks, calibration, grid, private=private)
        assert 1 / 3 <= lam * 0.5 * steps <= 3  # within 3x of early stopping's 1 / (lr * steps)
        assert (
            errors[grid.index(lam)] < 0.07 and errors.max() > 0.2
        )  # the calibrated surrogate fits; a bad lam does not
        chosen.append(lam)
    assert chosen[0] > chosen[1]  # ten times the training, a weaker calibrated regularization


def test_bad_input_is_a_clear_error():
    tasks = make_tasks(3, 4, 0.5)
    stats = [client_statistics(t) for t in tasks]
    with pytest.raises(ConfigError, match="empty subset"):
        solve_subsets(tasks, [(0,), ()], 0.1)
    with pytest.raises(ConfigError, match="outside 0..2"):
        solve_subsets(tasks, [(0, 3)], 0.1)
    with pytest.raises(ConfigError, match="outside 0..2"):
        solve_subsets_private(stats, [(-1,)], 0.1)
    with pytest.raises(ConfigError, match="repeats"):
        solve_subsets(tasks, [(1, 1)], 0.1)
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="lam must be > 0"):
            solve_subsets(tasks, [(0,)], lam)
        with pytest.raises(ConfigError, match="lam must be > 0"):
            solve_subsets_private(stats, [(0,)], lam)
    with pytest.raises(ConfigError, match="no subsets"):
        solve_subsets(tasks, [], 0.1)
    with pytest.raises(ConfigError, match="chunk_size"):
        solve_subsets(tasks, [(0,)], 0.1, chunk_size=0)
    other = make_tasks(1, 5, 0.5)[0]
    with pytest.raises(DataError, match="one sketch dimension"):
        solve_subsets([*tasks, other], [(0,)], 0.1)
    with pytest.raises(DataError, match="one sketch dimension"):
        solve_subsets_private([*stats, client_statistics(other)], [(0,)], 0.1)
    t = tasks[0]
    with pytest.raises(DataError, match="no validation rows"):
        TaskFeatures("x", t.train_outputs, t.train_features, t.val_outputs[:0], t.val_features[:0])
    with pytest.raises(DataError, match="do not match"):
        TaskFeatures("x", t.train_outputs[:1], t.train_features, t.val_outputs, t.val_features)
    with pytest.raises(DataError, match="d = 4 but validation features have d = 2"):
        TaskFeatures("x", t.train_outputs, t.train_features, t.val_outputs, t.val_features[:, :2])
    with pytest.raises(ConfigError, match="2 members but"):
        calibrate_lambda(tasks, [((0, 1), np.array([1.0]))], [0.1])
    with pytest.raises(ConfigError, match="at least one"):
        calibrate_lambda(tasks, [], [0.1])
