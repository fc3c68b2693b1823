"""EnsembleLoRA against its baselines at a converged training budget: a resumable experiment.

An ``Experiment`` names the protocol (the config every run shares), the learning rates of
the validation curve and the methods; ``experiments/shakespeare_converged.py`` and
``experiments/classification_report.py`` each define one and call ``main``.

Stages, each resumable (a finished run is skipped; an interrupted one continues from its
pipeline checkpoint with ``elora-fed run --resume``):
1. ``curve``: the one-adapter baseline trained up to ``curve_rounds`` rounds at each
   learning rate of ``curve_lrs``, with validation loss after every round, stopped after
   ``curve_patience`` rounds without a new lowest. The budget for every method is the
   learning rate with the lowest validation loss, and the earliest round within
   ``plateau_tolerance`` (relative) of that curve's minimum: where validation loss stops
   improving. Test data plays no part in the choice.
2. ``runs``: the methods of ``plan()`` at that budget, the most important first.
3. ``report``: tables, JSON and plots (the validation curves; the headline metric against
   compute) from whatever has finished ("N of M runs").

Compute, both ways: the paper's definition (``PAPER_PHASES``: the gradient pass, training
and boosting, plus MTL-FT's local fine-tuning, which runs in its weights phase, where its
step count is chosen on validation, and its test phase, and is counted as the FLOPs of
those two phases beyond one adapter's of the same seed; less training's validation passes,
``train.validation_every``) and the full count of every pass.

Every finished run writes ``<results>/runs/<key>.json``: its per-client test results, cost
ledger and the commit it ran at. Run an experiment from its own worktree at a fixed commit:

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from elora_fed.config import parse_override, toml_value
from strategies.baselines import method_settings

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_PHASES = ("sketch", "train", "boost")  # the paper's compute: gradient pass, training, boosting fits
Run = dict[str, Any]  # a finished run's summary (``record``)


@dataclass(frozen=True)
class Experiment:
    """One comparison: its protocol, how its budget is chosen, and which methods run.

    ``metric`` is the per-client result that the paired comparisons and the plot use
    (``test_loss``, or ``test_accuracy`` for classification); ``extend`` adds an experiment's own entries to the
    report from its methods' finished runs.
    """

    name: str  # results go to experiments/results/<name>/ and <name>.{json,md,png}
    title: str
    script: str
    protocol: dict[str, Any]
    curve_lrs: tuple[float, ...]
    curve_rounds: int
    finetune_steps: int  # MTL-FT's most local steps per client; the pipeline chooses 0 to this on validation
    curve_patience: int = 2  # the curve stops after this many rounds without a lower validation loss
    plateau_tolerance: float = 0.001
    core: tuple[str, ...] = ("ensemble", "qlora", "random")
    extra: tuple[str, ...] = ("ensemble-centered", "mtl-ft", "cosine", "local", "qlora-matched")
    nf4: tuple[str, ...] = ("ensemble", "qlora")
    m_sweep: tuple[int, ...] = ()  # EnsembleLoRA at these fixed m (clustering.num_groups), first seed
    metric: str = "test_loss"
    extend: Callable[[dict[str, list[Run]], dict[str, Any]], None] | None = field(default=None, compare=False)


def plan(exp: Experiment, seeds: list[int]) -> list[tuple[str, int, str]]:
    """(method, seed, precision) in the order they run: core methods seed by seed, then the rest."""
    runs = [(m, s, "bf16") for s in seeds for m in exp.core]
    runs += [(m, seeds[0], "bf16") for m in exp.extra]
    runs += [(sweep_method(m), seeds[0], "bf16") for m in exp.m_sweep]
    runs += [(m, seeds[0], "nf4") for m in exp.nf4]
    return runs


def sweep_method(m: int) -> str:
    """The m sweep's method name: EnsembleLoRA with ``clustering.num_groups = m``."""
    return f"ensemble-m{m}"


def sweep_m(method: str) -> int | None:
    """The fixed m of an m-sweep method, None for any other method."""
    prefix = "ensemble-m"
    return int(method[len(prefix) :]) if method.startswith(prefix) and method[len(prefix) :].isdigit() else None


def key_of(method: str, seed: int, precision: str) -> str:
    return f"{method}-seed{seed}" + ("-nf4" if precision == "nf4" else "")


def commit() -> str:
    here = Path(__file__).resolve().parent  # the commit of the code that ran, wherever the cwd is
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here
    ).stdout.strip()


def run_pipeline(settings: dict[str, Any], work: Path) -> Path:
    """``elora-fed run`` in its own process, resumed if an earlier attempt left a checkpoint."""
    work.mkdir(parents=True, exist_ok=True)
    previous = sorted(work.glob("pipeline-*/checkpoint"))
    if previous:
        cmd = [sys.executable, "-m", "elora_fed.cli", "run", "--resume", str(previous[-1].parent)]
    else:
        overrides = [f"--set={k}={toml_value(v)}" for k, v in settings.items()]
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
        "machine": machine(),
        "seconds": seconds,
        "clients": report["clients"],
        "average": report["average"],
        "num_groups": report["num_groups"],
        "group_sizes": report["group_sizes"],
        "boosts": report["boosts"],
        "finetune_steps": report.get("finetune_steps", 0),  # MTL-FT's, chosen on validation
        # the combined prediction's validation loss; the weights are fit on it, so it is in-sample for them
        "weights_validation_loss": next(
            (m["validation_loss"] for m in metrics if m["phase"] == "weights" and "validation_loss" in m), None
        ),
        "phases": {p: phase_cost(v) for p, v in accounting["phases"].items()},
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


def phase_cost(phase: dict[str, Any]) -> dict[str, Any]:
    """One phase of the run's ``accounting.json``: FLOPs, wall time, and the token positions and forward
    FLOPs that ``training_validation_flops`` splits evaluation from training with."""
    cost = {"flops": phase["flops"]["total"], "wall_s": phase["wall_s"], "forward_flops": phase["flops"]["forward"]}
    return {**cost, "tokens": {k: phase["tokens"][k] for k in ("forward", "backward")}}


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


def curve_stage(exp: Experiment, results: Path, work: Path, rounds: int) -> dict[str, Any]:
    """Run the learning curves and choose (learning rate, rounds) from validation loss alone."""
    curves = {}
    for lr in exp.curve_lrs:
        settings = {
            **exp.protocol,
            **seeded(0),
            **method_settings("qlora", exp.finetune_steps, None),
            "train.lr": lr,
            "train.rounds": rounds,
            "train.validation_every": 1,
            "train.patience": exp.curve_patience,
        }
        curves[lr] = execute(results, work, f"curve-lr{lr}", settings)["curve"]
    return choose_budget(exp, curves)


def choose_budget(exp: Experiment, curves: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    best_lr = min(curves, key=lambda lr: min(p["validation_loss"] for p in curves[lr]))
    points = curves[best_lr]
    lowest = min(p["validation_loss"] for p in points)
    rounds = next(p["round"] for p in points if p["validation_loss"] <= lowest * (1 + exp.plateau_tolerance))
    return {
        "lr": best_lr,
        "rounds": int(rounds),
        "local_steps": exp.protocol["train.local_steps"],
        # reached when the curve rose after its lowest point (patience stopped it), not when it ran out of rounds
        "plateau_reached": min(points, key=lambda p: p["validation_loss"])["round"] < points[-1]["round"],
        "curves": {str(lr): c for lr, c in curves.items()},
        "rule": f"lowest validation loss over lr in {list(exp.curve_lrs)}; earliest round within "
        f"{exp.plateau_tolerance:.2%} of that curve's minimum",
    }


def settings_for(
    exp: Experiment, method: str, seed: int, precision: str, budget: dict[str, Any], done: dict[str, Any]
) -> dict | None:
    """A run's settings, or None while a run it depends on has not finished."""
    base = {**exp.protocol, **seeded(seed), "train.lr": budget["lr"], "train.rounds": budget["rounds"]}
    if precision == "nf4":
        base["model.precision"] = "nf4"
    if (m := sweep_m(method)) is not None:
        return {**base, **method_settings("ensemble", exp.finetune_steps, None), "clustering.num_groups": m}
    if method == "random":
        ens = done.get(key_of("ensemble", seed, precision))
        return None if ens is None else {**base, **method_settings("random", exp.finetune_steps, ens["num_groups"])}
    if method == "qlora-matched":  # extra rounds until its paper-definition FLOPs equal EnsembleLoRA's
        ens, one = done.get(key_of("ensemble", seed, precision)), done.get(key_of("qlora", seed, precision))
        if ens is None or one is None:
            return None
        per_round = one["phases"]["train"]["flops"] / budget["rounds"]
        rounds = budget["rounds"] + math.ceil((paper_flops(ens) - paper_flops(one)) / per_round)
        return {**base, **method_settings("qlora", exp.finetune_steps, None), "train.rounds": rounds}
    return {**base, **method_settings(method, exp.finetune_steps, None)}


def paper_flops(run: dict[str, Any]) -> float:
    """The paper's compute: gradient pass, training and boosting fits (and MTL-FT's local fine-tuning).

    Training's validation evaluations (``train.validation_every``) are evaluation passes, not
    training: they are left out (``training_validation_flops``), as the paper leaves out evaluation.
    """
    phases = sum(run["phases"].get(p, {}).get("flops", 0.0) for p in PAPER_PHASES)
    return float(phases - training_validation_flops(run) + run.get("finetune_flops", 0.0))


def training_validation_flops(run: dict[str, Any]) -> float:
    """The train phase's forward-only passes: its validation evaluations (every training pass also runs backward).

    FLOPs are linear in token positions, so they are the phase's forward FLOPs times the
    share of its forward positions that had no backward pass. Runs recorded without token
    counts held no validation in their train phase (0).
    """
    train = run["phases"].get("train", {})
    tokens = train.get("tokens")
    if not tokens or not tokens["forward"]:
        return 0.0
    return float(train["forward_flops"] * (tokens["forward"] - tokens["backward"]) / tokens["forward"])


def full_flops(run: dict[str, Any]) -> float:
    return float(sum(p["flops"] for p in run["phases"].values()))


def runs_stage(
    exp: Experiment, results: Path, work: Path, budget: dict[str, Any], seeds: list[int], only: list[str] | None = None
) -> None:
    """The planned runs in order; ``only``: just these keys, in that order (the rest stay planned, for later)."""
    done: dict[str, Any] = {}
    pending = plan(exp, seeds)
    if only is not None:
        by_key = {key_of(*p): p for p in pending}
        pending = [by_key[k] for k in only]
    while pending:
        for method, seed, precision in list(pending):
            key = key_of(method, seed, precision)
            settings = settings_for(exp, method, seed, precision, budget, done)
            if settings is None:
                continue
            done[key] = execute(results, work, key, settings)
            pending.remove((method, seed, precision))
            write_report(exp, results, budget, seeds)
            break
        else:
            raise RuntimeError(f"runs wait on runs that cannot start: {pending}")


def per_client_difference(runs_a: list[Run], runs_b: list[Run], metric: str = "test_loss") -> np.ndarray:
    """Per client, the difference a - b of ``metric`` averaged over the seeds both have."""
    seeds = sorted({r["settings"]["seed"] for r in runs_a} & {r["settings"]["seed"] for r in runs_b})
    by_seed_a = {r["settings"]["seed"]: {c["client_id"]: c[metric] for c in r["clients"]} for r in runs_a}
    by_seed_b = {r["settings"]["seed"]: {c["client_id"]: c[metric] for c in r["clients"]} for r in runs_b}
    clients = sorted(set.intersection(*[set(by_seed_a[s]) & set(by_seed_b[s]) for s in seeds])) if seeds else []
    return np.array([np.mean([by_seed_a[s][c] - by_seed_b[s][c] for s in seeds]) for c in clients])


def bootstrap_interval(differences: np.ndarray, samples: int = 10_000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(samples, len(differences)))].mean(1)
    return [float(x) for x in np.percentile(means, [2.5, 97.5])]


def write_report(exp: Experiment, results: Path, budget: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Tables, JSON and plots from the finished runs."""
    planned = plan(exp, seeds)
    runs = {k: v for k in (key_of(*p) for p in planned) if (v := finished(results, k)) is not None}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for method, seed, precision in planned:
        run = runs.get(key_of(method, seed, precision))
        if run is not None:
            by_method.setdefault(method if precision == "bf16" else f"{method}-nf4", []).append(run)

    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}

    if "mtl-ft" in by_method and "qlora" in by_method:  # its local fine-tuning: choosing the steps, then the test

        def evaluation_flops(run: Run) -> float:
            return float(sum(run["phases"].get(p, {}).get("flops", 0.0) for p in ("weights", "test")))

        one_of = {r["settings"]["seed"]: evaluation_flops(r) for r in by_method["qlora"]}
        for r in by_method["mtl-ft"]:
            seed = r["settings"]["seed"]
            if seed in one_of:
                r["finetune_flops"] = evaluation_flops(r) - one_of[seed]
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
        # per run: a resumed experiment may finish on another CPU, and "auto" picks its dtype there
        "machines": {key: r.get("machine", "not recorded") for key, r in runs.items()},
        "runs_finished": len(runs),
        "runs_planned": len(planned),
        "commits": sorted({r["commit"] for r in runs.values()}),
        "protocol": exp.protocol,
        "num_clients": len(first["clients"]) if first else 0,
        "test_targets": int(sum(c["test_targets"] for c in first["clients"])) if first else 0,
        "seeds": {m: v["seeds"] for m, v in methods.items()},
        "rounds": budget["rounds"],
        "local_steps": budget["local_steps"],
        "lr": budget["lr"],
        "budget": budget,
        "methods": methods,
    }
    baselines = (("qlora", "qlora"), ("random", "random"), ("mtl-ft", "mtlft"))
    # keep-best against the same run keeping its last round's adapters: the choice of adapter alone
    comparisons = {
        "ensemble": baselines,
        "ensemble-centered": baselines,
        "ensemble-keep-best": (*baselines, ("ensemble-validated", "validated")),
    }
    for candidate, bases in comparisons.items():
        prefix = "" if candidate == "ensemble" else f"{candidate}."  # the keys are EnsembleLoRA's
        for base, name in bases:
            if candidate in by_method and base in by_method:
                out.update(
                    {prefix + k: v for k, v in compare(by_method[candidate], by_method[base], name, exp.metric).items()}
                )
    if exp.m_sweep:
        out["m_sweep"] = {"seed": seeds[0], "rows": m_sweep_rows(exp, by_method, seeds[0])}
    if exp.extend is not None:
        exp.extend(by_method, out)
    results.mkdir(parents=True, exist_ok=True)
    (results.parent / f"{results.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (results.parent / f"{results.name}.md").write_text(markdown(exp, out))
    plot(exp, results, out)
    return out


def compare(runs: list[Run], reference: list[Run], name: str, metric: str = "test_loss") -> dict[str, Any]:
    """``runs`` against ``reference`` on the seeds both have finished (seeds change the splits)."""
    common = {r["settings"]["seed"] for r in runs} & {r["settings"]["seed"] for r in reference}
    ours = [r for r in runs if r["settings"]["seed"] in common]
    theirs = [r for r in reference if r["settings"]["seed"] in common]

    def ratio(value: Callable[[Run], float]) -> float:
        return float(np.mean([value(r) for r in ours]) / np.mean([value(r) for r in theirs]))

    out: dict[str, Any] = {
        f"seeds_vs_{name}": sorted(common),
        f"loss_change_vs_{name}": ratio(average_test_loss) - 1,
        f"compute_ratio_vs_{name}": ratio(paper_flops),
        f"compute_ratio_vs_{name}_full": ratio(full_flops),
    }
    diff = per_client_difference(runs, reference, metric)
    if len(diff):
        out[f"paired_mean_difference_vs_{name}"] = float(diff.mean())
        out[f"paired_ci_vs_{name}"] = bootstrap_interval(diff)
    return out


def m_sweep_rows(exp: Experiment, by_method: dict[str, list[Run]], seed: int) -> list[dict[str, Any]]:
    """Test loss against m at the sweep's seed: one adapter (m = 1), each fixed m, and EnsembleLoRA's own choice.

    Rows are sorted by the number of groups the clustering found (a rounded partition may have fewer than m).
    """

    def at_seed(name: str) -> list[Run]:
        return [r for r in by_method.get(name, []) if r["settings"]["seed"] == seed]

    one = at_seed("qlora")
    rows = []
    for name, m in [("qlora", 1), ("ensemble", "auto"), *((sweep_method(m), m) for m in exp.m_sweep)]:
        for r in at_seed(name):
            row = {
                "method": name,
                "m": m,
                "groups": r["num_groups"],
                "group_sizes": sorted(r["group_sizes"].values(), reverse=True),
                "test_loss": r["average"]["ensemble"]["test_loss"],
                "test_accuracy": r["average"]["ensemble"]["test_accuracy"],
                "weights_validation_loss": r.get("weights_validation_loss"),
            }
            if name != "qlora" and one:
                vs = compare([r], one, "qlora", exp.metric)
                row["paired_mean_difference_vs_qlora"] = vs.get("paired_mean_difference_vs_qlora")
                row["paired_ci_vs_qlora"] = vs.get("paired_ci_vs_qlora")
            rows.append(row)
    return sorted(rows, key=lambda row: row["groups"])


def average_test_loss(run: dict[str, Any]) -> float:
    """A finished run's average test loss over its clients (the method's own prediction)."""
    return float(run["average"]["ensemble"]["test_loss"])


def plot(exp: Experiment, results: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = out.get("m_sweep", {}).get("rows", [])
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(16 if sweep else 11, 4))
    left, right = axes[0], axes[1]
    for lr, points in out["budget"]["curves"].items():
        left.plot([p["round"] for p in points], [p["validation_loss"] for p in points], marker="o", label=f"lr {lr}")
    left.axvline(out["rounds"], color="grey", linestyle=":", label=f"chosen: {out['rounds']} rounds")
    left.set(xlabel="round", ylabel="mean validation loss", title="one adapter: validation curve")
    left.legend()
    for name, m in out["methods"].items():
        right.errorbar(m["flops_paper"]["mean"], m[exp.metric]["mean"], yerr=m[exp.metric]["std"], fmt="o", label=name)
    right.set(
        xscale="log",
        xlabel="FLOPs (paper definition)",
        ylabel=f"mean {exp.metric.replace('_', ' ')}",
        title=f"{exp.metric.replace('_', ' ')} against compute",
    )
    right.legend(fontsize=8)
    if sweep:
        axes[2].plot([r["groups"] for r in sweep], [r["test_loss"] for r in sweep], marker="o")
        for r in sweep:
            axes[2].annotate(f"m={r['m']}", (r["groups"], r["test_loss"]), fontsize=8)
        axes[2].set(xlabel="groups found", ylabel="mean test loss", title=f"m sweep, seed {out['m_sweep']['seed']}")
    fig.suptitle(f"{out['runs_finished']} of {out['runs_planned']} runs")
    fig.tight_layout()
    fig.savefig(results.parent / f"{results.name}.png", dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """What the runs' speed depends on: the CPU, its cores, and the compute dtype ``auto`` picks there."""
    import os
    import platform

    from elora_fed.model.compute import resolve_compute_dtype
    from elora_fed.model.config import ModelConfig

    flags = (
        Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    )
    return {
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "compute_dtype": resolve_compute_dtype(ModelConfig()),
    }


def markdown(exp: Experiment, out: dict[str, Any]) -> str:
    partial = out["runs_finished"] < out["runs_planned"]
    lines = [
        f"# {exp.title}",
        "",
        f"**{out['runs_finished']} of {out['runs_planned']} runs**" + (" (partial)." if partial else "."),
        "",
        f"{out['num_clients']} clients, {out['test_targets']} test targets; protocol `{json.dumps(out['protocol'])}`; "
        f"budget from the validation curve: lr {out['lr']}, {out['rounds']} rounds x {out['local_steps']} local "
        f"steps ({out['budget']['rule']}; plateau reached: {out['budget']['plateau_reached']}). "
        f"Commits: {', '.join(c[:7] for c in out['commits'])}. Machine per run: `{json.dumps(out['machines'])}`. "
        f"Written by `{exp.script}`.",
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
        bare = key.rsplit(".", 1)[-1]  # "ensemble-centered.loss_change_vs_qlora" reads as the bare key
        if bare.startswith("seeds_vs"):
            lines.append(f"- `{key}` (the seeds the comparisons below use): {value}")
        elif bare.startswith(("loss_change", "accuracy_change", "compute_ratio", "paired")):
            if isinstance(value, list):
                shown = f"[{value[0]:+.4f}, {value[1]:+.4f}]"
            else:
                shown = f"{value:.3f}x" if bare.startswith("compute") else f"{value:+.4f}"
            lines.append(f"- `{key}`: {shown}")
    if out.get("m_sweep", {}).get("rows"):
        lines += [
            "",
            f"m sweep, seed {out['m_sweep']['seed']}: EnsembleLoRA at fixed m, its automatic choice "
            "and one adapter (m = 1). Validation loss is the combined prediction's, on the data its weights were "
            "fit on.",
            "",
            "| method | m | groups found | group sizes | test loss | top-1 | validation loss | paired vs one adapter |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in out["m_sweep"]["rows"]:
            ci = row.get("paired_ci_vs_qlora")
            paired = f"{row['paired_mean_difference_vs_qlora']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
            val = row["weights_validation_loss"]
            lines.append(
                f"| {row['method']} | {row['m']} | {row['groups']} | {row['group_sizes']} | {row['test_loss']:.4f} | "
                f"{row['test_accuracy']:.4f} | {'' if val is None else f'{val:.4f}'} | {paired} |"
            )
    if "per_task" in out:  # classification: accuracy per task, beside the majority-class baseline
        names = list(out["per_task"])
        lines += ["", "| task | majority | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
        for task in out["tasks"]:
            cells = [out["per_task"][n].get(task) for n in names]
            shown = [f"{c['mean']:.3f} ± {c['std']:.3f}" if c else "" for c in cells]
            lines.append(
                f"| {task} | {out['majority_accuracy'].get(task, float('nan')):.3f} | " + " | ".join(shown) + " |"
            )
    return "\n".join(lines) + "\n"


def main(exp: Experiment) -> None:
    parser = argparse.ArgumentParser(description=exp.title)
    parser.add_argument("--results", type=Path, default=RESULTS / exp.name, help="where run summaries and tables go")
    parser.add_argument("--work", type=Path, default=Path("runs") / exp.name, help="where the run directories go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage", choices=("all", "curve", "report"), default="all")
    parser.add_argument(
        "--runs", nargs="+", metavar="KEY", help="run only these planned runs, in this order (e.g. ensemble-m2-seed0)"
    )
    parser.add_argument("--curve-rounds", type=int, default=exp.curve_rounds)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="added to every run"
    )
    args = parser.parse_args()
    exp = replace(exp, protocol={**exp.protocol, **dict(parse_override(a) for a in args.overrides)})
    planned = [key_of(*p) for p in plan(exp, args.seeds)]
    if args.runs and (unknown := [k for k in args.runs if k not in planned]):
        parser.error(f"--runs: {', '.join(unknown)} not in the plan; planned runs: {', '.join(planned)}")
    budget = curve_stage(exp, args.results, args.work, args.curve_rounds) if args.stage != "report" else None
    if budget is None:
        budget = choose_budget(exp, {lr: finished(args.results, f"curve-lr{lr}")["curve"] for lr in exp.curve_lrs})
    (args.results / "budget.json").write_text(json.dumps(budget, indent=2) + "\n")
    print(f"budget: lr {budget['lr']}, {budget['rounds']} rounds x {budget['local_steps']} local steps", flush=True)
    if args.stage == "all":
        runs_stage(exp, args.results, args.work, budget, args.seeds, args.runs)
    print(markdown(exp, write_report(exp, args.results, budget, args.seeds)))
