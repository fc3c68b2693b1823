"""The run's report: ``report.json``, ``report.md`` and the console summary, from the finished run state.

Built from what the phases left in the run state (the test rows, the groups, the boosting
steps, the weights), the phase times, the cost ledger and the privacy account, so it can
be rebuilt from a checkpoint without asking a client anything.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from elora_fed.privacy.mechanism import markdown_lines
from strategies.evaluation import client_mean
from strategies.messaging import console
from strategies.run_state import RunState


def build_report(
    run: RunState, phases: tuple[str, ...], cost: dict[str, Any], privacy: dict[str, Any]
) -> dict[str, Any]:
    """The report of a run whose test phase is done: per-client rows and averages, seconds, cost, privacy."""
    groups, weights, test = run.groups(), run.info["weights"], run.info["test"]
    clients = sorted(weights)
    ensemble_groups = [str(g) for g in groups]  # the order of each client's weights
    rejected: Counter[str] = Counter()
    for line in (run.dir / "metrics.jsonl").read_text().splitlines():
        rejected.update(json.loads(line).get("rejected", {}))
    rows = [
        {"client_id": c, **test[c], "weights": dict(zip(ensemble_groups, weights[c], strict=True))}
        for c in clients
        if c in test
    ]
    average = {
        name: {key: client_mean(test, f"{prefix}{key}") for key in ("test_loss", "test_accuracy")}
        for name, prefix in (("ensemble", ""), ("own_group", "own_group_"), ("base_model", "base_"))
    }
    return {
        "run_dir": str(run.dir),
        "clients": rows,
        "average": average,
        "num_clients": len(rows),
        "unanswered": sorted(set(clients) - set(test)),
        "rejected_updates": dict(rejected),
        "num_groups": len(groups),
        "group_sizes": {str(g): len(m) for g, m in sorted(groups.items())},
        "boosts": run.info.get("boosts", []),
        # MTL-FT's local steps before the test, chosen on validation (0 for every other method)
        "finetune_steps": int(run.info.get("finetune_steps", 0)),
        "config": run.config.to_flat(),
        "seconds": run.info["seconds"],
        "cost": cost,
        "privacy": privacy,
        "phase_order": list(phases),
    }


def markdown(report: dict[str, Any]) -> str:
    avg = report["average"]
    lines = [
        f"# EnsembleLoRA run: {report['num_clients']} clients, {report['num_groups']} groups",
        "",
        "Test loss is log(1 + exp(-h)) per target (the next-token cross-entropy for LM clients), "
        "averaged per client and then over clients; accuracy is top-1 (the target has the largest "
        "combined h of all tokens; for one model, the argmax of the logits).",
        "",
        "| model | test loss | test accuracy |",
        "| --- | --- | --- |",
    ]
    for name, key in (
        ("base model (theta*)", "base_model"),
        ("own group adapter", "own_group"),
        ("ensemble", "ensemble"),
    ):
        lines.append(f"| {name} | {avg[key]['test_loss']:.4f} | {avg[key]['test_accuracy']:.4f} |")
    lines += ["", "## Phases (wall seconds)", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {p} | {report['seconds'][p]:.1f} |" for p in report["phase_order"] if p in report["seconds"]]
    lines += ["", "## Boosting", ""]
    lines += [
        f"- step {b['step']}: group {b['group']}, train loss {b['train_loss_before']:.4f} -> "
        f"{b['train_loss_after']:.4f} ({'kept' if b['kept'] else 'dropped; boosting stopped'})"
        for b in report["boosts"]
    ] or ["- none"]
    lines += markdown_lines(report["privacy"])
    lines += ["", "## Clients", "", "| client | group | test loss | accuracy | own group loss | base loss | weights |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in report["clients"]:
        weights = ", ".join(f"{g}: {w:.2f}" for g, w in r["weights"].items())
        lines.append(
            f"| {r['client_id']} | {r['group']} | {r['test_loss']:.4f} | {r['test_accuracy']:.3f} | "
            f"{r['own_group_test_loss']:.4f} | {r['base_test_loss']:.4f} | {weights} |"
        )
    return "\n".join(lines) + "\n"


def print_summary(report: dict[str, Any], run_dir: Path) -> None:
    console.print(f"EnsembleLoRA: {report['num_clients']} clients, {report['num_groups']} groups")
    table = Table()
    table.add_column("model")
    table.add_column("test loss", justify="right")
    table.add_column("test accuracy", justify="right")
    for name, key in (("base model", "base_model"), ("own group", "own_group"), ("ensemble", "ensemble")):
        avg = report["average"][key]
        table.add_row(name, f"{avg['test_loss']:.4f}", f"{avg['test_accuracy']:.4f}")
    console.print(table)
    seconds = report["seconds"]
    console.print("phases: " + ", ".join(f"{p} {seconds[p]:.0f} s" for p in report["phase_order"] if p in seconds))
    console.print(f"written to {run_dir}")
