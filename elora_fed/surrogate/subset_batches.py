"""Batching many surrogate subsets at once: the result type, input checks, chunks over the CPU cores,
every member's loss per subset, and batched SPD solves.

Shared by the exact solver (``elora_fed.surrogate.subset_solver``) and the solver from summed
statistics (``elora_fed.surrogate.quadratic_sums``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from elora_fed.errors import ConfigError, DataError
from elora_fed.threads import single_torch_thread

if TYPE_CHECKING:
    pass


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


def check_subsets(subsets: Sequence[Sequence[int]], n: int, lam: float, dims: set[int]) -> list[tuple[int, ...]]:
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


def chunks(order: np.ndarray, size: int | None, device: torch.device) -> list[np.ndarray]:
    """``order`` cut into pieces of ``size`` (default: 8 on the CPU, 512 on a GPU)."""
    if size is None:
        size = 8 if device.type == "cpu" else 512
    if size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {size}")
    return [order[start : start + size] for start in range(0, len(order), size)]


@contextmanager
def chunk_workers(device: torch.device) -> Iterator[int]:
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


def run_chunks(work: Callable[[np.ndarray], None], chunks: list[np.ndarray], workers: int) -> None:
    """Call ``work`` on every chunk, ``workers`` chunks at a time."""
    if workers == 1:
        for chunk in chunks:
            work(chunk)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, chunks))


def padded_index(lists: Sequence[Sequence[int] | np.ndarray], pad: int) -> np.ndarray:
    """Ragged index lists as one (len(lists), longest) int64 array, padded with ``pad``."""
    out = np.full((len(lists), max(len(x) for x in lists)), pad, dtype=np.int64)
    for k, x in enumerate(lists):
        out[k, : len(x)] = x
    return out


def member_losses_by_task(
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

    run_chunks(evaluate, chunks(np.arange(len(tasks)), block_size, w.device), workers)
    return losses


def padded(arrays: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrays of different lengths (rows first) as one zero-padded tensor (count, longest, ...) and its 0/1 row mask."""
    longest = max(len(a) for a in arrays)
    out = np.zeros((len(arrays), longest, *arrays[0].shape[1:]), dtype=np.float64)
    mask = np.zeros((len(arrays), longest))
    for k, a in enumerate(arrays):
        out[k, : len(a)] = a
        mask[k, : len(a)] = 1
    return torch.as_tensor(out, device=device, dtype=dtype), torch.as_tensor(mask, device=device, dtype=dtype)


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a batch of symmetric positive definite systems (C, d, d) x = (C, d)."""
    return cholesky_solve(cholesky(matrix), rhs)


def cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch (C, d, d) of symmetric positive definite matrices."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        raise DataError(
            "a surrogate Hessian is not positive definite in this precision; use a larger lam or dtype=torch.float64"
        )
    return factor


def cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x with L L^T x = rhs (C, d); two triangular solves (``cholesky_solve`` was 10x slower for one column)."""
    half = torch.linalg.solve_triangular(factor, rhs[:, :, None], upper=False)
    return torch.linalg.solve_triangular(factor.transpose(1, 2), half, upper=True).squeeze(-1)
