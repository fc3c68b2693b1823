"""EnsembleLoRA against its baselines on Shakespeare roles at a converged training budget; resumable.

The protocol (``PROTOCOL``): the 100 largest speaking roles, 32-token samples, at most 20
per role, split 13 train, 3 validation and 4 test (test 20%, as the paper's 80/20 split),
LoRA r=4 on SmolLM2-135M-Instruct, 3 local steps of 8 samples per round (about two local
epochs), learning rate 0.005. Sized for a 2-core AVX2 CPU without native bf16, where
``model.compute_dtype = "auto"`` runs fp32 and one training sample costs about 0.7 s: at
60 samples per role (the issue's example) one EnsembleLoRA run would take several hours.

Stages, each resumable (a finished run is skipped; an interrupted one continues from its
pipeline checkpoint with ``elora-fed run --resume``):
1. ``curve``: the one-adapter baseline trained up to ``CURVE_ROUNDS`` rounds at each
   learning rate of ``CURVE_LRS``, with validation loss after every round, stopped after
   ``CURVE_PATIENCE`` rounds without a new lowest. The budget for every method is the
   learning rate with the lowest validation loss, and the earliest round within
   ``PLATEAU_TOLERANCE`` (relative) of that curve's minimum: where validation loss stops
   improving. Test data plays no part in the choice.
2. ``runs``: the methods of ``plan()`` at that budget, the most important first.
3. ``report``: tables, JSON and plots (the validation curves; test loss against compute)
   from whatever has finished ("N of M runs").

Compute, both ways: the paper's definition (``PAPER_PHASES``: the gradient pass, training
and boosting, plus MTL-FT's local fine-tuning, which runs in its test phase and is
counted as its test FLOPs beyond one adapter's of the same seed) and the full count of
every pass.

Every finished run writes ``<results>/runs/<key>.json``: its per-client test results, cost
ledger and the commit it ran at. Run it from its own worktree at a fixed commit:

    git worktree add /work/converged <commit>
    cd /work/converged && nohup ../main/.venv/bin/python experiments/shakespeare_converged.py \\
        --results ../main/experiments/results/shakespeare_converged > converged.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from elora_fed.config import parse_override
from strategies.baselines import method_settings

RESULTS = Path(__file__).resolve().parent / "results" / "shakespeare_converged"
PROTOCOL: dict[str, Any] = {
    "data.num_clients": 100,
    "data.seq_len": 32,
    "data.max_samples_per_client": 20,
    "data.val_fraction": 0.15,
    "data.test_fraction": 0.2,
    "train.local_steps": 3,
    "train.batch_size": 8,
}
CURVE_LRS = (0.005,)  # one learning rate: a second curve would cost as much as two more runs here
CURVE_ROUNDS = 16
CURVE_PATIENCE = 2  # the curve stops after 2 rounds without a lower validation loss
PLATEAU_TOLERANCE = 0.001
FINETUNE_STEPS = 10  # MTL-FT's local steps per client (2 local epochs); fixed, not tuned
CORE = ("ensemble", "qlora", "random")
EXTRA = ("ensemble-centered", "mtl-ft", "cosine", "local", "qlora-matched")
PAPER_PHASES = ("sketch", "train", "boost")  # the paper's compute: gradient pass, training, boosting fits


def plan(seeds: list[int]) -> list[tuple[str, int, str]]:
    """(method, seed, precision) in the order they run: core methods seed by seed, then the rest."""
    runs = [(m, s, "bf16") for s in seeds for m in CORE]
    runs += [(m, seeds[0], "bf16") for m in EXTRA]
    runs += [(m, seeds[0], "nf4") for m in ("ensemble", "qlora")]
    return runs


def key_of(method: str, seed: int, precision: str) -> str:
    return f"{method}-seed{seed}" + ("-nf4" if precision == "nf4" else "")


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def run_pipeline(settings: dict[str, Any], work: Path) -> Path:
    """``elora-fed run`` in its own process, resumed if an earlier attempt left a checkpoint."""
    work.mkdir(parents=True, exist_ok=True)
    previous = sorted(work.glob("pipeline-*/checkpoint"))
    if previous:
        cmd = [sys.executable, "-m", "elora_fed.cli", "run", "--resume", str(previous[-1].parent)]
    else:
        overrides = [f"--set={k}={v}" for k, v in settings.items()]
        cmd = [sys.executable, "-m", "elora_fed.cli", "run", *overrides, f"--set=run_dir={work}"]
    with (work / "log.txt").open("a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    (run_dir,) = sorted(work.glob("pipeline-*"))[-1:]
    return run_dir


def finished(results: Path, key: str) -> dict[str, Any] | None:
    path = results / "runs" / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else None


def record(results: Path, key: str, settings: dict[str, Any], run_dir: Path, seconds: float) -> dict[str, Any]:
    """The run's summary, written once it has finished: the skip marker of a resumed experiment."""
    report = json.loads((run_dir / "report.json").read_text())
    accounting = json.loads((run_dir / "accounting.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "key": key,
        "settings": settings,
        "commit": commit(),
        "seconds": seconds,
        "clients": report["clients"],
        "average": report["average"],
        "num_groups": report["num_groups"],
        "group_sizes": report["group_sizes"],
        "boosts": report["boosts"],
        "phases": {p: {"flops": v["flops"]["total"], "wall_s": v["wall_s"]} for p, v in accounting["phases"].items()},
        "curve": [
            {"round": m["round"], "validation_loss": m["validation_loss"], "train_loss": _mean(m["train_loss"])}
            for m in metrics
            if m["phase"] == "train" and "validation_loss" in m
        ],
    }
    (results / "runs").mkdir(parents=True, exist_ok=True)
    path = results / "runs" / f"{key}.json"
    path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)
    return summary


def _mean(values: dict[str, float]) -> float:
    return float(np.mean(list(values.values()))) if values else float("nan")


def seeded(seed: int) -> dict[str, Any]:
    return {"seed": seed, "adapter.seed": seed, "sketch.seed": seed, "affinity.seed": seed}


def execute(results: Path, work: Path, key: str, settings: dict[str, Any]) -> dict[str, Any]:
    done = finished(results, key)
    if done is not None:
        return done
    print(f"{time.strftime('%H:%M:%S')} {key}: starting", flush=True)
    started = time.time()
    run_dir = run_pipeline(settings, work / key)
    summary = record(results, key, settings, run_dir, time.time() - started)
    loss = summary["average"]["ensemble"]["test_loss"]
    print(f"{time.strftime('%H:%M:%S')} {key}: test loss {loss:.4f}, {summary['seconds']:.0f} s", flush=True)
    return summary


def curve_stage(results: Path, work: Path, rounds: int) -> dict[str, Any]:
    """Run the learning curves and choose (learning rate, rounds) from validation loss alone."""
    curves = {}
    for lr in CURVE_LRS:
        settings = {
            **PROTOCOL,
            **seeded(0),
            **method_settings("qlora", FINETUNE_STEPS, None),
            "train.lr": lr,
            "train.rounds": rounds,
            "train.validation_every": 1,
            "train.patience": CURVE_PATIENCE,
        }
        curves[lr] = execute(results, work, f"curve-lr{lr}", settings)["curve"]
    return choose_budget(curves)


def choose_budget(curves: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    best_lr = min(curves, key=lambda lr: min(p["validation_loss"] for p in curves[lr]))
    points = curves[best_lr]
    lowest = min(p["validation_loss"] for p in points)
    rounds = next(p["round"] for p in points if p["validation_loss"] <= lowest * (1 + PLATEAU_TOLERANCE))
    return {
        "lr": best_lr,
        "rounds": int(rounds),
        "local_steps": PROTOCOL["train.local_steps"],
        # reached when the curve rose after its lowest point (patience stopped it), not when it ran out of rounds
        "plateau_reached": min(points, key=lambda p: p["validation_loss"])["round"] < points[-1]["round"],
        "curves": {str(lr): c for lr, c in curves.items()},
        "rule": f"lowest validation loss over lr in {list(CURVE_LRS)}; earliest round within "
        f"{PLATEAU_TOLERANCE:.2%} of that curve's minimum",
    }


def settings_for(method: str, seed: int, precision: str, budget: dict[str, Any], done: dict[str, Any]) -> dict | None:
    """A run's settings, or None while a run it depends on has not finished."""
    base = {**PROTOCOL, **seeded(seed), "train.lr": budget["lr"], "train.rounds": budget["rounds"]}
    if precision == "nf4":
        base["model.precision"] = "nf4"
    if method == "random":
        ens = done.get(key_of("ensemble", seed, precision))
        return None if ens is None else {**base, **method_settings("random", FINETUNE_STEPS, ens["num_groups"])}
    if method == "qlora-matched":  # extra rounds until its paper-definition FLOPs equal EnsembleLoRA's
        ens, one = done.get(key_of("ensemble", seed, precision)), done.get(key_of("qlora", seed, precision))
        if ens is None or one is None:
            return None
        per_round = one["phases"]["train"]["flops"] / budget["rounds"]
        rounds = budget["rounds"] + math.ceil((paper_flops(ens) - paper_flops(one)) / per_round)
        return {**base, **method_settings("qlora", FINETUNE_STEPS, None), "train.rounds": rounds}
    return {**base, **method_settings(method, FINETUNE_STEPS, None)}


def paper_flops(run: dict[str, Any]) -> float:
    """The paper's compute: gradient pass, training and boosting fits (and MTL-FT's local fine-tuning)."""
    return float(sum(run["phases"].get(p, {}).get("flops", 0.0) for p in PAPER_PHASES) + run.get("finetune_flops", 0.0))


def full_flops(run: dict[str, Any]) -> float:
    return float(sum(p["flops"] for p in run["phases"].values()))


def runs_stage(results: Path, work: Path, budget: dict[str, Any], seeds: list[int]) -> None:
    done: dict[str, Any] = {}
    pending = plan(seeds)
    while pending:
        for method, seed, precision in list(pending):
            key = key_of(method, seed, precision)
            settings = settings_for(method, seed, precision, budget, done)
            if settings is None:
                continue
            done[key] = execute(results, work, key, settings)
            pending.remove((method, seed, precision))
            write_report(results, budget, seeds)
            break
        else:
            raise RuntimeError(f"runs wait on runs that cannot start: {pending}")


def per_client_difference(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]]) -> np.ndarray:
    """Per client, the test-loss difference a - b averaged over the seeds both have."""
    seeds = sorted({r["settings"]["seed"] for r in runs_a} & {r["settings"]["seed"] for r in runs_b})
    by_seed_a = {r["settings"]["seed"]: {c["client_id"]: c["test_loss"] for c in r["clients"]} for r in runs_a}
    by_seed_b = {r["settings"]["seed"]: {c["client_id"]: c["test_loss"] for c in r["clients"]} for r in runs_b}
    clients = sorted(set.intersection(*[set(by_seed_a[s]) & set(by_seed_b[s]) for s in seeds])) if seeds else []
    return np.array([np.mean([by_seed_a[s][c] - by_seed_b[s][c] for s in seeds]) for c in clients])


def bootstrap_interval(differences: np.ndarray, samples: int = 10_000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(samples, len(differences)))].mean(1)
    return [float(x) for x in np.percentile(means, [2.5, 97.5])]


def write_report(results: Path, budget: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Tables, JSON and plots from the finished runs."""
    planned = plan(seeds)
    runs = {k: v for k in (key_of(*p) for p in planned) if (v := finished(results, k)) is not None}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for method, seed, precision in planned:
        run = runs.get(key_of(method, seed, precision))
        if run is not None:
            by_method.setdefault(method if precision == "bf16" else f"{method}-nf4", []).append(run)

    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}

    if "mtl-ft" in by_method and "qlora" in by_method:  # its local fine-tuning runs in the test phase
        test_of = {r["settings"]["seed"]: r["phases"]["test"]["flops"] for r in by_method["qlora"]}
        for r in by_method["mtl-ft"]:
            seed = r["settings"]["seed"]
            if seed in test_of:
                r["finetune_flops"] = r["phases"]["test"]["flops"] - test_of[seed]
    methods = {
        name: {
            "seeds": [r["settings"]["seed"] for r in rs],
            "test_loss": stat([r["average"]["ensemble"]["test_loss"] for r in rs]),
            "test_accuracy": stat([r["average"]["ensemble"]["test_accuracy"] for r in rs]),
            "own_group_test_loss": stat([r["average"]["own_group"]["test_loss"] for r in rs]),
            "base_test_loss": stat([r["average"]["base_model"]["test_loss"] for r in rs]),
            "groups": stat([r["num_groups"] for r in rs]),
            "flops_paper": stat([paper_flops(r) for r in rs]),
            "flops_full": stat([full_flops(r) for r in rs]),
            "wall_s": stat([r["seconds"] for r in rs]),
        }
        for name, rs in by_method.items()
    }
    first = next(iter(runs.values()), None)
    out: dict[str, Any] = {
        "machine": machine(),
        "runs_finished": len(runs),
        "runs_planned": len(planned),
        "commits": sorted({r["commit"] for r in runs.values()}),
        "protocol": PROTOCOL,
        "num_clients": len(first["clients"]) if first else 0,
        "test_targets": int(sum(c["test_targets"] for c in first["clients"])) if first else 0,
        "seeds": {m: v["seeds"] for m, v in methods.items()},
        "rounds": budget["rounds"],
        "local_steps": budget["local_steps"],
        "lr": budget["lr"],
        "budget": budget,
        "methods": methods,
    }
    for base, name in (("qlora", "qlora"), ("random", "random"), ("mtl-ft", "mtlft")):
        if "ensemble" in by_method and base in by_method:
            # Seeds change the splits: compare the two methods on the seeds both have finished.
            common = {r["settings"]["seed"] for r in by_method["ensemble"]} & {
                r["settings"]["seed"] for r in by_method[base]
            }
            ens_runs = [r for r in by_method["ensemble"] if r["settings"]["seed"] in common]
            ref_runs = [r for r in by_method[base] if r["settings"]["seed"] in common]
            out[f"seeds_vs_{name}"] = sorted(common)

            def mean(rs: list[dict[str, Any]], value: Any) -> float:
                return float(np.mean([value(r) for r in rs]))

            out[f"loss_change_vs_{name}"] = mean(ens_runs, average_test_loss) / mean(ref_runs, average_test_loss) - 1
            out[f"compute_ratio_vs_{name}"] = mean(ens_runs, paper_flops) / mean(ref_runs, paper_flops)
            out[f"compute_ratio_vs_{name}_full"] = mean(ens_runs, full_flops) / mean(ref_runs, full_flops)
            diff = per_client_difference(by_method["ensemble"], by_method[base])
            if len(diff):
                out[f"paired_mean_difference_vs_{name}"] = float(diff.mean())
                out[f"paired_ci_vs_{name}"] = bootstrap_interval(diff)
    results.mkdir(parents=True, exist_ok=True)
    (results.parent / f"{results.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (results.parent / f"{results.name}.md").write_text(markdown(out))
    plot(results, out)
    return out


def average_test_loss(run: dict[str, Any]) -> float:
    """A finished run's average test loss over its clients (the method's own prediction)."""
    return float(run["average"]["ensemble"]["test_loss"])


def plot(results: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for lr, points in out["budget"]["curves"].items():
        left.plot([p["round"] for p in points], [p["validation_loss"] for p in points], marker="o", label=f"lr {lr}")
    left.axvline(out["rounds"], color="grey", linestyle=":", label=f"chosen: {out['rounds']} rounds")
    left.set(xlabel="round", ylabel="mean validation loss", title="one adapter: validation curve")
    left.legend()
    for name, m in out["methods"].items():
        right.errorbar(
            m["flops_paper"]["mean"], m["test_loss"]["mean"], yerr=m["test_loss"]["std"], fmt="o", label=name
        )
    right.set(
        xscale="log", xlabel="FLOPs (paper definition)", ylabel="mean test loss", title="test loss against compute"
    )
    right.legend(fontsize=8)
    fig.suptitle(f"{out['runs_finished']} of {out['runs_planned']} runs")
    fig.tight_layout()
    fig.savefig(results.parent / f"{results.name}.png", dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """What the runs' speed depends on: the CPU, its cores, and the compute dtype ``auto`` picks there."""
    import os
    import platform

    from elora_fed.compute import resolve_compute_dtype
    from elora_fed.config import ModelConfig

    flags = (
        Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    )
    return {
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "compute_dtype": resolve_compute_dtype(ModelConfig()),
    }


def markdown(out: dict[str, Any]) -> str:
    partial = out["runs_finished"] < out["runs_planned"]
    lines = [
        "# Shakespeare at a converged budget",
        "",
        f"**{out['runs_finished']} of {out['runs_planned']} runs**" + (" (partial)." if partial else "."),
        "",
        f"{out['num_clients']} roles, {out['test_targets']} test targets; protocol `{json.dumps(out['protocol'])}`; "
        f"budget from the validation curve: lr {out['lr']}, {out['rounds']} rounds x {out['local_steps']} local "
        f"steps ({out['budget']['rule']}; plateau reached: {out['budget']['plateau_reached']}). "
        f"Commits: {', '.join(c[:7] for c in out['commits'])}. Machine: `{json.dumps(out['machine'])}`. "
        "Written by `experiments/shakespeare_converged.py`.",
        "",
        "| method | seeds | test loss | top-1 accuracy | own group loss | groups | FLOPs (paper) | FLOPs (full) | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in out["methods"].items():
        lines.append(
            f"| {name} | {m['seeds']} | {m['test_loss']['mean']:.4f} ± {m['test_loss']['std']:.4f} | "
            f"{m['test_accuracy']['mean']:.4f} ± {m['test_accuracy']['std']:.4f} | "
            f"{m['own_group_test_loss']['mean']:.4f} | {m['groups']['mean']:.1f} | {m['flops_paper']['mean']:.3g} | "
            f"{m['flops_full']['mean']:.3g} | {m['wall_s']['mean']:.0f} |"
        )
    lines.append("")
    for key, value in out.items():
        if key.startswith("seeds_vs"):
            lines.append(f"- `{key}` (the seeds the comparisons below use): {value}")
        elif key.startswith(("loss_change", "compute_ratio", "paired")):
            if isinstance(value, list):
                shown = f"[{value[0]:+.4f}, {value[1]:+.4f}]"
            else:
                shown = f"{value:.3f}x" if key.startswith("compute") else f"{value:+.4f}"
            lines.append(f"- `{key}`: {shown}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="where run summaries and tables go")
    parser.add_argument("--work", type=Path, default=Path("runs/converged"), help="where the run directories go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage", choices=("all", "curve", "report"), default="all")
    parser.add_argument("--curve-rounds", type=int, default=CURVE_ROUNDS)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="added to every run"
    )
    args = parser.parse_args()
    PROTOCOL.update(parse_override(a) for a in args.overrides)
    budget = curve_stage(args.results, args.work, args.curve_rounds) if args.stage != "report" else None
    if budget is None:
        budget = choose_budget({lr: finished(args.results, f"curve-lr{lr}")["curve"] for lr in CURVE_LRS})
    (args.results / "budget.json").write_text(json.dumps(budget, indent=2) + "\n")
    print(f"budget: lr {budget['lr']}, {budget['rounds']} rounds x {budget['local_steps']} local steps", flush=True)
    if args.stage == "all":
        runs_stage(args.results, args.work, budget, args.seeds)
    print(markdown(write_report(args.results, budget, args.seeds)))


if __name__ == "__main__":
    main()
