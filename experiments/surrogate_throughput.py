"""Throughput of the batched surrogate solver (``elora_fed.surrogate.subset_solver``): many subsets, one CPU.

Target (issue): 2000 subsets of 10 clients out of 500, d = 400, solved on 2 CPU cores in
<= 60 s. Synthetic features shaped like real sketches: 20-80 train rows per client (and
an eighth as many validation rows, at least 2), b ~ N(-4, 1), g ~ N(0, 0.05^2 I). Timed:
exact mode (damped Newton to |grad| <= 1e-6, float32) on the random subsets and, apart,
on the 500 singletons (a subset also stops at float32's rounding floor of its gradient,
if that is above 1e-6); the clients' private statistics (each client's own small job,
run here one after another with one thread); private mode on the same subsets and
singletons. Also reported: how far private mode's estimates are from exact mode's, and
how many subsets ``sample_subsets`` needs to cover every pair at this size.
Results go to experiments/results/surrogate_throughput.{json,md}.

    python experiments/surrogate_throughput.py [--clients 500] [--dim 400] [--subsets 2000] [--size 10]
        [--lam 1e-3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from elora_fed.surrogate.affinity import sample_subsets
from elora_fed.surrogate.quadratic_sums import solve_subsets_private
from elora_fed.surrogate.statistics import ClientStatistics, client_statistics
from elora_fed.surrogate.subset_batches import SubsetEstimates
from elora_fed.surrogate.subset_solver import solve_subsets
from elora_fed.surrogate.task_features import TaskFeatures

RESULTS = Path(__file__).parent / "results"
Result = TypeVar("Result")


def synthetic_tasks(clients: int, dim: int, seed: int) -> list[TaskFeatures]:
    rng = np.random.default_rng(seed)

    def rows(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.tensor(rng.normal(-4.0, 1.0, count), dtype=torch.float32)
        return b, torch.tensor(rng.normal(0.0, 0.05, (count, dim)), dtype=torch.float32)

    tasks = []
    for i in range(clients):
        train = int(rng.integers(20, 81))
        tasks.append(TaskFeatures(f"client{i:04d}", *rows(train), *rows(max(2, train // 8))))
    return tasks


def timed(fn: Callable[[], Result], device: torch.device) -> tuple[Result, float]:
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def summary(est: SubsetEstimates, seconds: float) -> dict[str, float]:
    return {
        "subsets": len(est.subsets),
        "seconds": seconds,
        "subsets_per_s": len(est.subsets) / seconds,
        "newton_iterations_mean": float(est.iterations.mean()),
        "newton_iterations_max": int(est.iterations.max()),
        "max_grad_norm_at_exit": float(est.grad_norm.max()),
    }


def mebibytes(stats: ClientStatistics) -> float:
    """What one client sends in private mode."""
    tensors = [getattr(split, f.name) for split in (stats.train, stats.validation) for f in dataclasses.fields(split)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--subsets", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="surrogate_throughput")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tasks = synthetic_tasks(args.clients, args.dim, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    subsets = [
        tuple(sorted(int(i) for i in rng.choice(args.clients, args.size, replace=False))) for _ in range(args.subsets)
    ]
    singletons = [(i,) for i in range(args.clients)]
    solve_subsets(tasks, subsets[:8], args.lam, device=device)  # warm-up: kernels, thread pools
    solve_subsets_private([client_statistics(t) for t in tasks[:20]], [tuple(range(10))], args.lam, device=device)

    exact, exact_s = timed(lambda: solve_subsets(tasks, subsets, args.lam, device=device), device)
    exact_single, exact_single_s = timed(lambda: solve_subsets(tasks, singletons, args.lam, device=device), device)
    torch.set_num_threads(1)
    stats, stats_s = timed(lambda: [client_statistics(t) for t in tasks], torch.device("cpu"))
    torch.set_num_threads(args.threads)
    private, private_s = timed(lambda: solve_subsets_private(stats, subsets, args.lam, device=device), device)
    private_single, private_single_s = timed(
        lambda: solve_subsets_private(stats, singletons, args.lam, device=device), device
    )
    load_after = os.getloadavg()
    relative = np.abs(private.losses[:, : args.size] - exact.losses[:, : args.size]) / exact.losses[:, : args.size]
    report = {
        "setup": {
            "clients": args.clients,
            "dim": args.dim,
            "subset_size": args.size,
            "lam": args.lam,
            "tol": 1e-6,
            "dtype": "float32",
            "device": args.device,
            "torch_threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_1min_before_after": [load_before[0], load_after[0]],
            "machine": platform.machine(),
            "torch": torch.__version__,
            "train_rows_mean": float(np.mean([len(t.train_outputs) for t in tasks])),
            "pair_covering_subsets_from_sample_subsets": len(
                sample_subsets(args.clients, args.size, args.subsets, args.seed)
            ),
        },
        "exact_subsets": summary(exact, exact_s),
        "exact_singletons": summary(exact_single, exact_single_s),
        "client_statistics": {"clients": args.clients, "seconds": stats_s, "mib_per_client": mebibytes(stats[0])},
        "private_subsets": summary(private, private_s),
        "private_singletons": summary(private_single, private_single_s),
        "private_vs_exact": {
            "median_relative_difference_of_f": float(np.median(relative)),
            "p90_relative_difference_of_f": float(np.quantile(relative, 0.9)),
            "relative_w_distance": float((private.w - exact.w).norm() / exact.w.norm()),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Surrogate solver throughput ({args.device}, {args.threads} threads, {args.clients} clients, "
        f"d = {args.dim}, subsets of {args.size}, lam = {args.lam:g})",
        "",
        "| stage | subsets | seconds | subsets / s | Newton iterations mean / max | max gradient norm at exit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("exact_subsets", "exact_singletons", "private_subsets", "private_singletons"):
        r = report[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {r['subsets']} | {r['seconds']:.2f} | {r['subsets_per_s']:.0f} | "
            f"{r['newton_iterations_mean']:.2f} / {r['newton_iterations_max']} | {r['max_grad_norm_at_exit']:.1e} |"
        )
    agreement = report["private_vs_exact"]
    lines += [
        "",
        f"Client statistics: {stats_s:.2f} s for all {args.clients} clients, one after another on one thread "
        f"({report['client_statistics']['mib_per_client']:.2f} MiB sent per client). Private vs exact f^: median relative "
        f"difference {agreement['median_relative_difference_of_f']:.3f}, 90th percentile "
        f"{agreement['p90_relative_difference_of_f']:.3f}; relative distance of w "
        f"{agreement['relative_w_distance']:.3f}. Load average (1 min) before / after: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores.",
    ]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
