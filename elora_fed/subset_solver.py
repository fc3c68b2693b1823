"""Surrogate fine-tuning of task subsets in sketch space (docs/METHOD.md §3), batched over subsets.

Fine-tuning on the union of the tasks in a subset S is replaced by a regularized logistic
regression on the tasks' projected gradient features, with loss(z) = log(1 + exp(-z)):

    w_S    = argmin_w (1/|D_S|) sum_{s in D_S} loss(b_s + g_s . w) + (lam/2) |w|^2
    f^_i(S) = mean_{v in V_i} loss(b_v + g_v . w_S)          for every member i of S

Task affinity needs thousands of subsets, so no generic solver runs per subset. Exact mode
(``solve_subsets``) runs one damped Newton method on a chunk of subsets at once: each
subset's train rows are gathered into a padded (chunk, rows, d) tensor with 1/|D_S|
weights (0 on padding); subsets are ordered by row count before chunking, so padding
stays small; a subset leaves the batch once its gradient norm is <= ``tol``. The Hessian
X^T diag(loss'') X / |D_S| + lam I is formed (one batched matmul) and Cholesky-factored
only once, at w = 0; every Newton system is then solved by conjugate gradients with that
factor as preconditioner, each CG step two matrix-vector passes over the rows. Later
Hessians differ from H(0) only through the curvature at the moved outputs, so a few CG
steps suffice. Measured at d = 400 on 2 busy CPU cores, this took 2.3 s per 256 subsets
of 10 clients where a fresh Hessian and factorization every Newton step took 4.2 s.
On the CPU, chunks of 8 subsets run on one thread per core (``_chunk_workers``).

Private-statistics mode (``solve_subsets_private``, beyond the paper): each client sends
only additive statistics (``elora_fed.statistics``) of a second-order expansion of its
losses around w = 0 (counts, loss sums, gradient sums, d x d curvature sums; train and
validation), which can go through secure aggregation. The server solves each subset's quadratic surrogate exactly
(one Newton step) and evaluates f^ from the validation quadratic. Its w_S is the first,
undamped Newton step of exact mode, so the two agree while the moves are small. The
solver (``solve_subset_sums``) needs only each subset's summed train statistics and a way
to evaluate members' validation quadratics (``SubsetSums``): ``PooledStatistics`` sums
per-client statistics on the server; the secure mode (``strategies.secure_statistics``)
gets the sums from secure aggregation and the losses from the clients.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from elora_fed.errors import ConfigError, DataError
from elora_fed.statistics import ClientStatistics, SplitStatistics
from elora_fed.threads import single_torch_thread

if TYPE_CHECKING:
    from elora_fed.task_features import TaskFeatures


@dataclass(frozen=True)
class SubsetEstimates:
    """Solutions of many subsets: w_S and every member's estimated validation loss f^_i(S)."""

    subsets: tuple[tuple[int, ...], ...]
    lam: float
    w: torch.Tensor  # (K, d), on the CPU
    losses: np.ndarray  # (K, max |S|): losses[k, j] = f^_{S_k[j]}(S_k); NaN past |S_k|
    iterations: np.ndarray  # (K,) Newton steps taken (1 in private mode: one step solves a quadratic)
    grad_norm: np.ndarray  # (K,) norm of the solved objective's gradient at exit

    def member_losses(self, k: int) -> dict[int, float]:
        """{task: f^_task(S_k)} for subset k."""
        return {i: float(v) for i, v in zip(self.subsets[k], self.losses[k], strict=False)}


def solve_subsets(
    tasks: Sequence[TaskFeatures],
    subsets: Sequence[Sequence[int]],
    lam: float,
    *,
    tol: float = 1e-6,
    max_iter: int = 50,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SubsetEstimates:
    """Exact mode: fine-tune the surrogate on every subset until |grad| <= tol (or max_iter steps).

    A subset also stops once its gradient is at the rounding floor of ``dtype``, when that
    is above ``tol`` (see ``_newton``); ``grad_norm`` in the result says where each stopped.

    Only the tasks that appear in ``subsets`` are read. A chunk of subsets holds about
    chunk_size * (rows per subset + 2 d) * d numbers of ``dtype`` on ``device``; by default
    8 subsets on the CPU (their rows stay in cache: 2x faster than 256 at d = 400, measured)
    and 512 on a GPU.
    """
    checked = _check_subsets(subsets, len(tasks), lam, {t.dim for t in tasks})
    dev = torch.device(device)
    with _chunk_workers(dev) as workers:
        used = sorted({i for s in checked for i in s})
        counts = np.zeros(len(tasks), dtype=np.int64)
        counts[used] = [len(tasks[i].train_outputs) for i in used]
        starts = np.concatenate([[0], np.cumsum(counts)])
        pad_row = int(starts[-1])  # index of an all-zero padding row
        rows = torch.cat([*(tasks[i].train_features for i in used), torch.zeros(1, tasks[used[0]].dim)]).to(dev, dtype)
        row_b = torch.cat([*(tasks[i].train_outputs for i in used), torch.zeros(1)]).to(dev, dtype)
        sizes = np.array([counts[list(s)].sum() for s in checked])

        w = torch.empty(len(checked), rows.shape[1], dtype=dtype, device=dev)
        iterations = np.zeros(len(checked), dtype=np.int64)
        grad_norm = np.zeros(len(checked))

        def solve(chunk: np.ndarray) -> None:
            index = _padded_index(
                [np.concatenate([np.arange(starts[i], starts[i + 1]) for i in checked[k]]) for k in chunk], pad_row
            )
            index_t = torch.as_tensor(index, device=dev)
            weight = (index_t != pad_row).to(dtype) / torch.as_tensor(sizes[chunk], device=dev, dtype=dtype)[:, None]
            w[chunk], steps, norms = _newton(rows[index_t], row_b[index_t], weight, lam, tol, max_iter)
            iterations[chunk] = steps.cpu().numpy()
            grad_norm[chunk] = norms.cpu().numpy()

        # sorted by row count, a chunk's subsets need little padding
        _run_chunks(solve, _chunks(np.argsort(sizes, kind="stable"), chunk_size, dev), workers)

        def validation_loss(block: np.ndarray, w_block: torch.Tensor) -> torch.Tensor:
            b, b_mask = _padded([tasks[i].val_outputs.numpy() for i in block], dev, dtype)
            g, _ = _padded([tasks[i].val_features.numpy() for i in block], dev, dtype)
            z = b[:, :, None] + g @ w_block.transpose(1, 2)  # (tasks, rows, subsets)
            return (b_mask[:, :, None] * F.softplus(-z)).sum(1) / b_mask.sum(1)[:, None]

        losses = _member_losses(checked, w, validation_loss, workers)
        return SubsetEstimates(tuple(checked), float(lam), w.cpu(), losses, iterations, grad_norm)


class SubsetSums(ABC):
    """Where the private-statistics surrogate gets its inputs: every subset's summed train statistics, and each
    member's validation loss at a point w.

    The private mode pools per-client statistics on the server (``PooledStatistics``); the
    secure mode (``strategies.secure_statistics``) gets each subset's sum from one round of
    secure aggregation and asks each client for its own validation losses. Both are solved
    by ``solve_subset_sums`` with the same formulas (``quadratic_solutions``,
    ``quadratic_losses``).
    """

    num_clients: int
    dim: int
    chunk_size: int | None = None  # subsets whose sums are formed and solved at once (None: ``_chunks``' default)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @contextmanager
    def workers(self) -> Iterator[int]:
        """How many chunks may be solved at once (``train_sums`` is then called from that many threads)."""
        yield 1

    @abstractmethod
    def train_sums(self, subsets: Sequence[tuple[int, ...]]) -> SplitStatistics:
        """The subsets' summed train statistics, batched: count (C,), loss (C,), grad (C, d), curv (C, d, d)."""

    @abstractmethod
    def member_losses(self, subsets: Sequence[tuple[int, ...]], w: torch.Tensor, workers: int) -> np.ndarray:
        """(K, max |S|) f^_i(S_k) for member i at position j of subset k (NaN past |S_k|), given w (K, d)."""

    def singles(self, lam: float) -> SubsetEstimates:
        """Every client alone: its singleton subset solved like any other."""
        return solve_subset_sums(self, [(i,) for i in range(self.num_clients)], lam)


def quadratic_solutions(sums: SplitStatistics, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w_S = -(curv_S / n_S + lam I)^-1 (grad_S / n_S) for a batch of subsets' train sums, and the residual norm.

    The residual is the norm of the quadratic surrogate's gradient at the computed w_S.
    """
    n = sums.count[:, None]
    hessian = sums.curv / n[:, :, None] + lam * torch.eye(sums.curv.shape[-1], device=n.device, dtype=n.dtype)
    grad = sums.grad / n
    w = -_spd_solve(hessian, grad)
    residual = (hessian @ w[:, :, None]).squeeze(-1) + grad
    return w, torch.linalg.vector_norm(residual, dim=1)


def quadratic_losses(validation: SplitStatistics, w: torch.Tensor) -> torch.Tensor:
    """f^ = (loss + grad . w + w^T curv w / 2) / count for T tasks' validation statistics (batched over T)
    at each of m points per task, w (T, m, d): returns (T, m)."""
    quadratic = ((w @ validation.curv) * w).sum(2)
    linear = (w @ validation.grad[:, :, None]).squeeze(2)
    return (validation.loss[:, None] + linear + 0.5 * quadratic) / validation.count[:, None]


def stack_statistics(splits: Sequence[SplitStatistics], device: torch.device, dtype: torch.dtype) -> SplitStatistics:
    """Statistics of several clients (or subsets) as one batched ``SplitStatistics``."""
    return SplitStatistics(
        *(torch.stack([getattr(s, f.name) for s in splits]).to(device, dtype) for f in fields(SplitStatistics))
    )


class PooledStatistics(SubsetSums):
    """Private mode: the server holds every client's statistics and sums them itself.

    The sums over a chunk's members are one sparse (subsets x clients) matrix product.
    """

    def __init__(
        self,
        stats: Sequence[ClientStatistics],
        *,
        chunk_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not stats:
            raise DataError("no tasks given")
        dims = {s.dim for s in stats}
        if len(dims) != 1:
            raise DataError(f"all tasks must share one sketch dimension d, got {sorted(dims)}")
        self.stats = stats
        self.num_clients, self.dim = len(stats), dims.pop()
        self.chunk_size, self.device, self.dtype = chunk_size, torch.device(device), dtype

    @contextmanager
    def workers(self) -> Iterator[int]:
        with _chunk_workers(self.device) as workers:
            self._train, self._validation  # noqa: B018  stacked once, single-threaded, before the chunks run
            yield workers

    @functools.cached_property
    def _train(self) -> torch.Tensor:
        """(n, 2 + d + d^2): every client's count, loss, grad and flattened curv in one row, summed by one product."""
        rows = [
            torch.cat([t.reshape(-1).to(self.dtype) for t in (s.train.count, s.train.loss, s.train.grad, s.train.curv)])
            for s in self.stats
        ]
        return torch.stack(rows).to(self.device)

    @functools.cached_property
    def _validation(self) -> SplitStatistics:
        return stack_statistics([s.validation for s in self.stats], self.device, self.dtype)

    def train_sums(self, subsets: Sequence[tuple[int, ...]]) -> SplitStatistics:
        owner = torch.as_tensor(np.repeat(np.arange(len(subsets)), [len(s) for s in subsets]), device=self.device)
        member = torch.as_tensor(np.concatenate(subsets), device=self.device)
        ones = torch.ones(len(member), device=self.device, dtype=self.dtype)
        membership = torch.sparse_coo_tensor(
            torch.stack([owner, member]), ones, (len(subsets), self.num_clients), check_invariants=True
        )
        sums = torch.sparse.mm(membership, self._train)
        d = self.dim
        return SplitStatistics(sums[:, 0], sums[:, 1], sums[:, 2 : 2 + d], sums[:, 2 + d :].view(len(subsets), d, d))

    def member_losses(self, subsets: Sequence[tuple[int, ...]], w: torch.Tensor, workers: int) -> np.ndarray:
        validation = self._validation

        def validation_loss(block: np.ndarray, w_block: torch.Tensor) -> torch.Tensor:
            index = torch.as_tensor(block, device=self.device)
            part = SplitStatistics(*(getattr(validation, f.name)[index] for f in fields(SplitStatistics)))
            return quadratic_losses(part, w_block)

        return _member_losses(subsets, w, validation_loss, workers)


def solve_subset_sums(sums: SubsetSums, subsets: Sequence[Sequence[int]], lam: float) -> SubsetEstimates:
    """Every subset's quadratic surrogate from its summed statistics (the private and secure modes).

    w_S = -(H_S / n_S + lam I)^-1 (grad_S / n_S) with n_S, grad_S, H_S the sums of the members'
    train statistics (``quadratic_solutions``); f^_i(S) = (loss_i + grad_i . w_S + w_S^T curv_i
    w_S / 2) / n_i from member i's validation statistics (``quadratic_losses``, wherever
    ``sums.member_losses`` evaluates it). ``grad_norm`` is the residual of the quadratic's gradient.
    """
    checked = _check_subsets(subsets, sums.num_clients, lam, {sums.dim})
    with sums.workers() as workers:
        w = torch.empty(len(checked), sums.dim, dtype=sums.dtype, device=sums.device)
        grad_norm = np.zeros(len(checked))

        def solve(chunk: np.ndarray) -> None:
            part = sums.train_sums([checked[k] for k in chunk])
            part = SplitStatistics(*(getattr(part, f.name).to(sums.device, sums.dtype) for f in fields(part)))
            w[chunk], norms = quadratic_solutions(part, lam)
            grad_norm[chunk] = norms.cpu().numpy()

        _run_chunks(solve, _chunks(np.arange(len(checked)), sums.chunk_size, sums.device), workers)
        losses = sums.member_losses(checked, w, workers)
    return SubsetEstimates(
        tuple(checked), float(lam), w.cpu(), losses, np.ones(len(checked), dtype=np.int64), grad_norm
    )


def solve_subsets_private(
    stats: Sequence[ClientStatistics],
    subsets: Sequence[Sequence[int]],
    lam: float,
    *,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SubsetEstimates:
    """Private-statistics mode: every subset's quadratic surrogate, from sums of the clients' statistics
    (``solve_subset_sums`` on ``PooledStatistics``)."""
    if not lam > 0:
        raise ConfigError(f"lam must be > 0 (the surrogate is unbounded without it), got {lam}")
    pooled = PooledStatistics(stats, chunk_size=chunk_size, device=device, dtype=dtype)
    return solve_subset_sums(pooled, subsets, lam)


def _check_subsets(subsets: Sequence[Sequence[int]], n: int, lam: float, dims: set[int]) -> list[tuple[int, ...]]:
    if not lam > 0:
        raise ConfigError(f"lam must be > 0 (the surrogate is unbounded without it), got {lam}")
    if n == 0:
        raise DataError("no tasks given")
    if len(dims) != 1:
        raise DataError(f"all tasks must share one sketch dimension d, got {sorted(dims)}")
    if not subsets:
        raise ConfigError("no subsets to solve")
    checked = [tuple(int(i) for i in s) for s in subsets]
    for s in checked:
        if not s:
            raise ConfigError("empty subset: every subset needs at least one task")
        if min(s) < 0 or max(s) >= n:
            raise ConfigError(f"subset {s} has a task index outside 0..{n - 1}")
        if len(set(s)) != len(s):
            raise ConfigError(f"subset {s} repeats a task")
    return checked


def _chunks(order: np.ndarray, size: int | None, device: torch.device) -> list[np.ndarray]:
    """``order`` cut into pieces of ``size`` (default: 8 on the CPU, 512 on a GPU)."""
    if size is None:
        size = 8 if device.type == "cpu" else 512
    if size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {size}")
    return [order[start : start + size] for start in range(0, len(order), size)]


@contextmanager
def _chunk_workers(device: torch.device) -> Iterator[int]:
    """How many chunks to solve at once. On the CPU: one per torch thread, every op single-threaded meanwhile.

    Chunks are independent and write disjoint outputs, so the cores take whole chunks
    instead of splitting every op. That matters on a shared machine, where a thread of a
    parallel op is often descheduled and the others wait at its barrier: torch's batched
    LAPACK calls let MKL thread each 400 x 400 factorization, which made one factorization
    12x slower with 2 threads than with one (12 ms vs 1 ms, measured on a busy 2-core
    machine), and stacking 500 clients' statistics took seconds instead of 0.1 s. The
    thread count is restored on exit; other threads' torch ops run single-threaded meanwhile.
    """
    if device.type != "cpu":
        yield 1
        return
    with single_torch_thread() as threads:
        yield threads


def _run_chunks(work: Callable[[np.ndarray], None], chunks: list[np.ndarray], workers: int) -> None:
    """Call ``work`` on every chunk, ``workers`` chunks at a time."""
    if workers == 1:
        for chunk in chunks:
            work(chunk)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, chunks))


def _padded_index(lists: Sequence[Sequence[int] | np.ndarray], pad: int) -> np.ndarray:
    """Ragged index lists as one (len(lists), longest) int64 array, padded with ``pad``."""
    out = np.full((len(lists), max(len(x) for x in lists)), pad, dtype=np.int64)
    for k, x in enumerate(lists):
        out[k, : len(x)] = x
    return out


def _member_losses(
    subsets: Sequence[tuple[int, ...]],
    w: torch.Tensor,
    validation_loss: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
    workers: int,
    block_size: int = 64,
) -> np.ndarray:
    """(K, max |S|) array of f^_i(S) per member position, NaN past |S|, evaluated in blocks of tasks.

    ``validation_loss(tasks, W)`` takes a block of task ids and W (tasks, m, d), the w of m
    subsets containing each task (padded by repeating subset 0), and returns every task's
    validation loss under each of its w (tasks, m). So each task's validation data is read
    once, however many subsets contain it, and every step is a batched matmul.
    """
    owner = np.repeat(np.arange(len(subsets)), [len(s) for s in subsets])
    position = np.concatenate([np.arange(len(s)) for s in subsets])
    order = np.lexsort((owner, np.concatenate(subsets)))  # pairs grouped by task
    owner, position = owner[order], position[order]
    tasks, first, counts = np.unique(np.concatenate(subsets)[order], return_index=True, return_counts=True)
    slot = np.arange(len(order)) - np.repeat(first, counts)  # rank of a pair within its task
    losses = np.full((len(subsets), max(map(len, subsets))), np.nan)

    def evaluate(block: np.ndarray) -> None:
        pairs = slice(first[block[0]], first[block[-1]] + counts[block[-1]])
        row = np.repeat(np.arange(len(block)), counts[block])
        index = np.zeros((len(block), counts[block].max()), dtype=np.int64)
        index[row, slot[pairs]] = owner[pairs]
        values = validation_loss(tasks[block], w[torch.as_tensor(index, device=w.device)]).cpu().numpy()
        losses[owner[pairs], position[pairs]] = values[row, slot[pairs]]

    _run_chunks(evaluate, _chunks(np.arange(len(tasks)), block_size, w.device), workers)
    return losses


def _padded(
    arrays: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrays of different lengths (rows first) as one zero-padded tensor (count, longest, ...) and its 0/1 row mask."""
    longest = max(len(a) for a in arrays)
    out = np.zeros((len(arrays), longest, *arrays[0].shape[1:]), dtype=np.float64)
    mask = np.zeros((len(arrays), longest))
    for k, a in enumerate(arrays):
        out[k, : len(a)] = a
        mask[k, : len(a)] = 1
    return torch.as_tensor(out, device=device, dtype=dtype), torch.as_tensor(mask, device=device, dtype=dtype)


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a batch of symmetric positive definite systems (C, d, d) x = (C, d)."""
    return _cholesky_solve(_cholesky(matrix), rhs)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch (C, d, d) of symmetric positive definite matrices."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        raise DataError(
            "a surrogate Hessian is not positive definite in this precision; use a larger lam or dtype=torch.float64"
        )
    return factor


def _cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x with L L^T x = rhs (C, d); two triangular solves (``cholesky_solve`` was 10x slower for one column)."""
    half = torch.linalg.solve_triangular(factor, rhs[:, :, None], upper=False)
    return torch.linalg.solve_triangular(factor.transpose(1, 2), half, upper=True).squeeze(-1)


def _newton(
    x: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, lam: float, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped inexact Newton on a batch of padded problems: rows x (C, m, d), outputs b (C, m).

    ``weight`` (C, m) is each row's weight in its problem's mean loss: 1 / |D_S|, and 0 on
    padding. Returns w (C, d), the Newton steps each problem took, and its final gradient
    norm. A problem leaves the batch once its gradient norm is <= tol, or <= the rounding
    floor of the gradient in this dtype (4 eps times the sum of the terms' norms), so that
    float32 stops rather than spins when tol is below what it can resolve.

    Each Newton system H(w) p = -grad is solved by conjugate gradients preconditioned with
    the Cholesky factor of H(0): the Hessian is formed and factored once per problem, and
    every CG step costs two matrix-vector passes over the rows. At w = 0 the preconditioner
    is exact, so the first step is the private-mode solution; later Hessians differ from
    H(0) only through the loss curvature at the moved outputs. The CG tolerance shrinks
    with the gradient (Eisenstat-Walker), and steps are damped by Armijo backtracking.
    """
    count, _, d = x.shape
    w = x.new_zeros(count, d)
    steps = torch.zeros(count, dtype=torch.int64, device=x.device)
    grad_norm = x.new_zeros(count)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    p0 = torch.sigmoid(-b)
    factor = _cholesky(x.transpose(1, 2) @ ((weight * p0 * (1 - p0))[:, :, None] * x) + lam * eye)
    row_norm = torch.linalg.vector_norm(x, dim=2)
    eps = torch.finfo(x.dtype).eps
    active = torch.arange(count, device=x.device)
    w_a = w
    for step in range(max_iter + 1):
        z = b + (x @ w_a[:, :, None]).squeeze(-1)
        p = torch.sigmoid(-z)  # -loss'(z)
        grad = lam * w_a - (x.transpose(1, 2) @ (weight * p)[:, :, None]).squeeze(-1)
        norm = torch.linalg.vector_norm(grad, dim=1)
        grad_norm[active] = norm
        floor = 4 * eps * ((weight * p * row_norm).sum(1) + lam * torch.linalg.vector_norm(w_a, dim=1))
        keep = norm > floor.clamp(min=tol)
        if step == max_iter or not bool(keep.any()):
            break
        if not bool(keep.all()):
            active, x, b, weight, row_norm, factor, w_a, z, p, grad, norm = (
                t[keep] for t in (active, x, b, weight, row_norm, factor, w_a, z, p, grad, norm)
            )
        curvature = weight * p * (1 - p)

        def hessian_times(v: torch.Tensor, x: torch.Tensor = x, curvature: torch.Tensor = curvature) -> torch.Tensor:
            return lam * v + (x.transpose(1, 2) @ (curvature * (x @ v[:, :, None]).squeeze(-1))[:, :, None]).squeeze(-1)

        direction = _pcg(hessian_times, factor, -grad, rtol=norm.sqrt().clamp(max=0.5))
        moved = (x @ direction[:, :, None]).squeeze(-1)
        t = _armijo(z, moved, weight, w_a, direction, grad, lam)
        w_a = w_a + t[:, None] * direction
        w[active] = w_a
        steps[active] += 1
    return w, steps, grad_norm


def _pcg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    factor: torch.Tensor,
    rhs: torch.Tensor,
    rtol: torch.Tensor,
    max_iter: int = 200,
) -> torch.Tensor:
    """Batched conjugate gradients for A x = rhs (C, d), preconditioned by the Cholesky factor of an approximate A.

    Each problem stops updating once its residual is <= rtol * |rhs|.
    """
    x = torch.zeros_like(rhs)
    r = rhs
    z = _cholesky_solve(factor, r)
    direction = z
    rz = (r * z).sum(1)
    target = rtol * torch.linalg.vector_norm(rhs, dim=1)
    for _ in range(max_iter):
        running = torch.linalg.vector_norm(r, dim=1) > target
        if not bool(running.any()):
            break
        a_dir = matvec(direction)
        alpha = torch.where(running, rz / (direction * a_dir).sum(1), 0)
        x = x + alpha[:, None] * direction
        r = r - alpha[:, None] * a_dir
        z = _cholesky_solve(factor, r)
        rz_next = (r * z).sum(1)
        direction = z + torch.where(running, rz_next / rz, 0)[:, None] * direction
        rz = rz_next
    return x


def _armijo(
    z: torch.Tensor,
    moved: torch.Tensor,
    weight: torch.Tensor,
    w: torch.Tensor,
    direction: torch.Tensor,
    grad: torch.Tensor,
    lam: float,
    max_halvings: int = 40,
) -> torch.Tensor:
    """Per-problem step t in {1, 1/2, 1/4, ...} with sufficient decrease; z + t * moved are the new outputs."""

    def objective(t: torch.Tensor) -> torch.Tensor:
        w_t = w + t[:, None] * direction
        return (weight * F.softplus(-(z + t[:, None] * moved))).sum(1) + 0.5 * lam * (w_t * w_t).sum(1)

    t = torch.ones_like(z[:, 0])
    start = objective(torch.zeros_like(t))
    slope = (grad * direction).sum(1)
    slack = 16 * torch.finfo(z.dtype).eps * start.abs()
    for _ in range(max_halvings):
        short = objective(t) > start + 1e-4 * t * slope + slack
        if not bool(short.any()):
            break
        t = torch.where(short, t / 2, t)
    return t
