"""The surrogate from summed statistics (the private and secure modes), batched over subsets.

Private-statistics mode (``solve_subsets_private``, beyond the paper): each client sends
only additive statistics (``elora_fed.surrogate.statistics``) of a second-order expansion of its
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields

import numpy as np
import torch

from elora_fed.errors import ConfigError, DataError
from elora_fed.surrogate.statistics import ClientStatistics, SplitStatistics
from elora_fed.surrogate.subset_batches import (
    SubsetEstimates,
    check_subsets,
    chunk_workers,
    chunks,
    member_losses_by_task,
    run_chunks,
    spd_solve,
)


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
    chunk_size: int | None = None  # subsets whose sums are formed and solved at once (None: ``chunks``' default)
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
    w = -spd_solve(hessian, grad)
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
        with chunk_workers(self.device) as workers:
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

        return member_losses_by_task(subsets, w, validation_loss, workers)


def solve_subset_sums(sums: SubsetSums, subsets: Sequence[Sequence[int]], lam: float) -> SubsetEstimates:
    """Every subset's quadratic surrogate from its summed statistics (the private and secure modes).

    w_S = -(H_S / n_S + lam I)^-1 (grad_S / n_S) with n_S, grad_S, H_S the sums of the members'
    train statistics (``quadratic_solutions``); f^_i(S) = (loss_i + grad_i . w_S + w_S^T curv_i
    w_S / 2) / n_i from member i's validation statistics (``quadratic_losses``, wherever
    ``sums.member_losses`` evaluates it). ``grad_norm`` is the residual of the quadratic's gradient.
    """
    checked = check_subsets(subsets, sums.num_clients, lam, {sums.dim})
    with sums.workers() as workers:
        w = torch.empty(len(checked), sums.dim, dtype=sums.dtype, device=sums.device)
        grad_norm = np.zeros(len(checked))

        def solve(chunk: np.ndarray) -> None:
            part = sums.train_sums([checked[k] for k in chunk])
            part = SplitStatistics(*(getattr(part, f.name).to(sums.device, sums.dtype) for f in fields(part)))
            w[chunk], norms = quadratic_solutions(part, lam)
            grad_norm[chunk] = norms.cpu().numpy()

        run_chunks(solve, chunks(np.arange(len(checked)), sums.chunk_size, sums.device), workers)
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
