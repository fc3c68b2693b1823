"""EnsembleLoRA against its baselines on Shakespeare roles: the same clients, splits and budget, 3 seeds.

Methods (each a configuration of the same Flower app, ``strategies.baselines``):
- ``ensemble``: EnsembleLoRA (affinity groups, per-group FedAvg, boosting, weights);
- ``qlora``: one adapter trained by FedAvg on all clients;
- ``mtl-ft``: that adapter, then fine-tuned locally per client (``--finetune-steps``);
- ``cosine``: groups from gradient cosine similarity (same m selection, boosting, weights);
- ``random``: random groups with the m EnsembleLoRA found (same seed's run);
- ``local``: one adapter per client, trained on its own data only.

Every run is ``elora-fed run`` in its own process (its own Ray); its ``report.json`` and
``accounting.json`` (FLOPs from tokens and parameters, bytes, peak memory, wall time) are
collected into ``experiments/results/<name>.{md,json}`` with mean and standard deviation
over seeds, the headline comparisons in ``<name>.json`` (``loss_change_vs_qlora``,
``compute_ratio_vs_qlora``, ``loss_change_vs_mtlft``, ``compute_ratio_vs_mtlft``), and
plots: test loss against FLOPs (the paper's Figure 4), the affinity heatmap ordered by
group, and training curves.

    python experiments/shakespeare_report.py --name shakespeare_report [--seeds 0 1 2] \\
        [--set data.num_clients=50 --set ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from strategies.baselines import METHODS, method_settings

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(settings: dict[str, Any], out: Path, log: Path) -> Path:
    overrides = [f"--set={k}={v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "elora_fed.cli", "run", *overrides, f"--set=run_dir={out}"]
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    (run_dir,) = sorted(out.glob("pipeline-*"))[-1:]
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="shakespeare_report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--finetune-steps", type=int, default=8, help="MTL-FT's local steps per client")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=Path("runs/report"), help="where the runs go")
    args = parser.parse_args()
    base = dict(a.split("=", 1) for a in args.overrides)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    started = time.time()
    for seed in args.seeds:
        seeded = {**base, "seed": seed, "adapter.seed": seed, "sketch.seed": seed, "affinity.seed": seed}
        m = None
        for method in args.methods:
            out = args.work / f"{method}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            t0 = time.time()
            run_dir = run_one({**seeded, **method_settings(method, args.finetune_steps, m)}, out, out / "log.txt")
            report = json.loads((run_dir / "report.json").read_text())
            accounting = json.loads((run_dir / "accounting.json").read_text())
            if method == "ensemble":
                m = report["num_groups"]
            runs[method].append({"seed": seed, "run_dir": str(run_dir), "report": report, "accounting": accounting})
            print(
                f"{method} seed {seed}: test loss {report['average']['ensemble']['test_loss']:.4f}, "
                f"{report['num_groups']} groups, {time.time() - t0:.0f} s",
                flush=True,
            )
    write_results(args.name, runs, base, time.time() - started)


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    return {
        "test_loss": stat([e["report"]["average"]["ensemble"]["test_loss"] for e in entries]),
        "test_accuracy": stat([e["report"]["average"]["ensemble"]["test_accuracy"] for e in entries]),
        "flops": stat([e["accounting"]["total"]["flops"] for e in entries]),
        "peak_client_rss_gib": stat([e["accounting"]["total"]["peak_client_rss_bytes"] / 2**30 for e in entries]),
        "bytes_mib": stat(
            [
                (e["accounting"]["total"]["bytes_sent"] + e["accounting"]["total"]["bytes_received"]) / 2**20
                for e in entries
            ]
        ),
        "wall_s": stat([e["accounting"]["total"]["wall_s"] for e in entries]),
        "groups": stat([e["report"]["num_groups"] for e in entries]),
        "seeds": [e["seed"] for e in entries],
    }


def write_results(name: str, runs: dict[str, list[dict[str, Any]]], settings: dict[str, str], seconds: float) -> None:
    summary = {method: summarize(entries) for method, entries in runs.items() if entries}
    headline: dict[str, Any] = {"settings": settings, "total_seconds": seconds, "methods": summary}
    ens = summary.get("ensemble")
    for base, key in (("qlora", "qlora"), ("mtl-ft", "mtlft")):
        if ens and base in summary:
            ref = summary[base]
            headline[f"loss_change_vs_{key}"] = ens["test_loss"]["mean"] / ref["test_loss"]["mean"] - 1
            headline[f"compute_ratio_vs_{key}"] = ens["flops"]["mean"] / ref["flops"]["mean"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(headline, indent=2) + "\n")
    lines = [
        f"# {name}",
        "",
        f"Settings: `{json.dumps(settings)}`; seeds {summary[next(iter(summary))]['seeds']}; "
        f"total {seconds / 60:.0f} min.",
        "",
        "| method | test loss | test accuracy | groups | FLOPs | peak client RSS GiB | MiB exchanged | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {s['test_loss']['mean']:.4f} ± {s['test_loss']['std']:.4f} | "
            f"{s['test_accuracy']['mean']:.4f} ± {s['test_accuracy']['std']:.4f} | {s['groups']['mean']:.1f} | "
            f"{s['flops']['mean']:.3g} | {s['peak_client_rss_gib']['mean']:.2f} | {s['bytes_mib']['mean']:.1f} | "
            f"{s['wall_s']['mean']:.0f} |"
        )
    lines.append("")
    for key in ("loss_change_vs_qlora", "compute_ratio_vs_qlora", "loss_change_vs_mtlft", "compute_ratio_vs_mtlft"):
        if key in headline:
            lines.append(f"- `{key}`: {headline[key]:+.4f}" if "loss" in key else f"- `{key}`: {headline[key]:.3f}")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(name, runs, summary)
    print("\n".join(lines))


def plot(name: str, runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, s in summary.items():
        ax.errorbar(s["flops"]["mean"], s["test_loss"]["mean"], yerr=s["test_loss"]["std"], fmt="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (whole run)")
    ax.set_ylabel("average test loss")
    ax.legend()
    ax.set_title("test loss against compute")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_loss_vs_flops.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, entries in runs.items():
        metrics = [json.loads(x) for x in (Path(entries[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        curve = [np.mean(list(m["train_loss"].values())) for m in metrics if m["phase"] == "train" and m["train_loss"]]
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=method)
    ax.set_xlabel("training round")
    ax.set_ylabel("mean local training loss")
    ax.legend()
    ax.set_title("training curves (first seed)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_training_curves.png", dpi=120)
    plt.close(fig)

    if "ensemble" in runs:
        heatmap = Path(runs["ensemble"][0]["run_dir"]) / "affinity.png"
        if heatmap.exists():
            shutil.copy(heatmap, RESULTS / f"{name}_affinity.png")


if __name__ == "__main__":
    main()
