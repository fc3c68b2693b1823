"""The federated EnsembleLoRA pipeline: the phases in order, one run directory, a checkpoint after each step.

Phases: wait for the nodes, sketch, affinity and groups, per-group federated training,
boosting, ensemble weights (learned on validation), final evaluation on test. Each phase
is a class in ``strategies.phases``; this module only orders them, writes the artifacts,
and checkpoints after every phase and every training round, so ``resume`` continues a
killed run and, with every random choice seeded by (seed, phase, group, round), reproduces
the uninterrupted result.

Clients that fail (error, timeout, ``federation.drop_rate``) do not stop a run unless an
exchange falls below ``federation.min_fraction``. Each phase goes on without them:
- sketch: a client without a sketch is assigned to the largest group (ties: the lowest
  group number), the adapter trained on the most clients, and is listed in ``groups.json``
  under ``without_sketch``;
- training and boosting: each round aggregates the updates that arrived and passed
  ``strategies.validation``; a group with none keeps its adapter for that round;
- ensemble weights: a client without learned weights puts all weight on its own group;
- test: evaluation is retried (``federation.retries``); clients that still fail are listed
  in ``report.json`` under ``unanswered`` and left out of the averages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp import Grid
from rich.table import Table

from elora_fed.adapters import save_peft_adapter
from elora_fed.checkpoint import Checkpoint, Snapshot, group_ensembles
from elora_fed.client_sketch import ClientSketch, load_sketches
from elora_fed.clustering import canonical_labels
from elora_fed.config import DataConfig, ModelConfig, RunConfig
from elora_fed.ensemble import AdapterState, GroupAdapters
from elora_fed.errors import ConfigError, DataError
from elora_fed.plots import affinity_heatmap
from elora_fed.privacy import describe, markdown_lines, privacy_report
from elora_fed.run_dir import boost_adapter_dir, create_run_dir, group_adapter_dir, write_json
from elora_fed.statistics import ClientStatistics, load_statistics, save_statistics
from strategies.federation import Federation, discover, wait_for_nodes
from strategies.ledger import Ledger
from strategies.messaging import Exchange, console
from strategies.phases import (
    BoostReply,
    EnsembleEvaluation,
    GroupTraining,
    SketchPhase,
    exchange_metrics,
    first_order_boost,
    load_class,
    make_aggregation,
    query_boost,
)
from strategies.secure_statistics import SecureStatistics

PHASES = ("sketch", "groups", "train", "boost", "weights", "test")


class PipelineRun:
    """A run directory with its metrics log and checkpoint; created new or reopened to resume."""

    def __init__(self, config: RunConfig) -> None:
        if config.resume:
            self.dir = Path(config.resume)
            saved = self.dir / "config.json"
            if not saved.exists():
                raise ConfigError(f"resume = {config.resume!r} is not a run directory: it has no config.json")
            # The saved config is the run's config; only `resume` itself comes from this launch.
            self.config = dataclasses.replace(RunConfig.from_flat(json.loads(saved.read_text())), resume=config.resume)
        else:
            self.config = config
            self.dir = create_run_dir(config, "pipeline")
        self.checkpoint = Checkpoint(self.dir)
        self.snapshot = self.checkpoint.load() or Snapshot(info={"done": [], "seconds": {}, "metrics_lines": 0})
        self.info = self.snapshot.info
        self._truncate_metrics(int(self.info["metrics_lines"]))
        if config.resume:
            console.log(f"resuming {self.dir}: done {self.info['done'] or 'nothing'}")

    def done(self, phase: str) -> bool:
        return phase in self.info["done"]

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (kept in step with the checkpoint)."""
        with (self.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n")
        self.info["metrics_lines"] += 1

    def save(self) -> None:
        self.checkpoint.save(self.snapshot)

    def complete(self, phase: str, started: float) -> None:
        seconds = self.info["seconds"]
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started
        self.info["done"].append(phase)
        self.save()
        console.log(f"[bold]{phase}[/bold] done in {seconds[phase]:.1f} s")

    def _truncate_metrics(self, lines: int) -> None:
        path = self.dir / "metrics.jsonl"
        if path.exists():
            kept = path.read_text().splitlines(keepends=True)[:lines]
            path.write_text("".join(kept))


def run_pipeline(grid: Grid, config: RunConfig) -> Path:
    """Run (or resume) the whole pipeline on ``grid``; returns the run directory.

    The run directory's ``status.json`` says ``running``, ``finished`` or ``failed`` (with
    the error): what a script checks, since ``flwr run --stream`` exits 0 either way.
    """
    logging.getLogger("flwr").setLevel(logging.WARNING)  # concise logs: the phases report progress
    run = PipelineRun(config)
    write_json(run.dir / "status.json", {"state": "running", "started": time.time()})
    try:
        _run_phases(grid, run)
    except BaseException as e:
        write_json(run.dir / "status.json", {"state": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    write_json(run.dir / "status.json", {"state": "finished", "finished": time.time()})
    return run.dir


def _run_phases(grid: Grid, run: PipelineRun) -> None:
    config = run.config
    console.log(f"run directory {run.dir}")
    expected = config.federation.num_nodes or count_clients(config.data, config.model)
    ledger = Ledger(run.info.setdefault("ledger", {}))
    fed = discover(grid, config, wait_for_nodes(grid, expected, config.federation.wait_s), ledger)
    write_json(run.dir / "clients.json", [{"client_id": c, **fed.samples[c]} for c in fed.client_ids])

    clustering_class = load_class(config.strategies.clustering, "strategies.clustering")
    needs_affinity = bool(getattr(clustering_class, "needs_affinity", True))
    privacy = privacy_report(config, releases=int(needs_affinity))  # one sketch-phase release per client
    if config.privacy.enabled:
        console.log(describe(privacy))
    if needs_affinity and not run.done("sketch"):
        started = time.perf_counter()
        fed.phase = "sketch"
        collected, result = SketchPhase().run(fed)
        for item in collected:
            if isinstance(item, ClientSketch):
                item.save(run.dir / "sketches")
        statistics = [item for item in collected if isinstance(item, tuple)]
        if statistics:
            save_statistics(run.dir / "statistics.npz", [c for c, _ in statistics], [s for _, s in statistics])
        run.log({"phase": "sketch", **exchange_metrics(result)})
        run.complete("sketch", started)
    if not run.done("groups"):
        started = time.perf_counter()
        fed.phase = "groups"
        _group(run, fed, needs_affinity)
        run.complete("groups", started)
    groups = _groups(run.info["labels"], run.info["client_ids"])
    if sorted(run.info["client_ids"]) != fed.client_ids:
        raise DataError("the federation's clients differ from the ones this run was grouped for")

    if not run.done("train"):
        started = time.perf_counter()
        fed.phase = "train"
        _train(run, fed, groups)
        run.complete("train", started)
    ensemble = group_ensembles(run.snapshot, groups)
    if not run.done("boost"):
        started = time.perf_counter()
        fed.phase = "boost"
        ensemble = _boost(run, fed, groups, ensemble)
        run.complete("boost", started)
    if not run.done("weights"):
        started = time.perf_counter()
        fed.phase = "weights"
        own = {c: g for g, members in groups.items() for c in members}
        fallback = {c: [float(g == own[c]) for g in ensemble] for c in fed.client_ids}
        if len(ensemble) == 1:  # one group: nothing to weigh
            run.info["weights"] = {c: [1.0] for c in fed.client_ids}
        elif getattr(clustering_class, "own_group_only", False):
            run.info["weights"] = fallback  # each client's own adapter (local training): nothing to learn
        else:
            per_client, result = EnsembleEvaluation(fed).run(
                "ensemble weights", "validation", {c: ensemble for c in fed.client_ids}
            )
            run.info["weights"] = {c: per_client[c]["weights"] if c in per_client else fallback[c] for c in fallback}
            run.log({"phase": "weights", "validation_loss": _mean(per_client, "loss"), **exchange_metrics(result)})
        write_json(run.dir / "ensemble_weights.json", {"groups": sorted(groups), "weights": run.info["weights"]})
        run.complete("weights", started)
    started = time.perf_counter()
    fed.phase = "test"
    report = _final_report(run, fed, groups, ensemble)
    run.info["seconds"]["test"] = time.perf_counter() - started
    report["seconds"] = run.info["seconds"]
    accounting = ledger.summary(fed.model_size, run.info["seconds"])
    write_json(run.dir / "accounting.json", accounting)
    report["cost"] = dict(accounting["total"])
    report["privacy"] = privacy
    write_json(run.dir / "report.json", report)
    (run.dir / "report.md").write_text(_markdown(report))
    run.info["done"].append("test")
    run.save()
    _print_summary(report, run.dir)


@functools.lru_cache(maxsize=4)
def count_clients(data: DataConfig, model: ModelConfig) -> int:
    """How many clients the data config selects (loaded once per process: the CLI and the server share it)."""
    from elora_fed.federated_data import load_clients
    from elora_fed.models import load_tokenizer

    return len(load_clients(data, load_tokenizer(model)))


def _group(run: PipelineRun, fed: Federation, needs_affinity: bool) -> None:
    config = run.config
    affinity: np.ndarray | None = None
    ids = fed.client_ids
    if needs_affinity:
        collected: list[ClientSketch] | list[ClientStatistics] | SecureStatistics
        if config.affinity.mode == "secure":  # every client, even one that missed the sketch phase: it computes then
            collected = SecureStatistics(fed, ids)
        elif (run.dir / "statistics.npz").exists():
            ids, collected = load_statistics(run.dir / "statistics.npz")
        else:
            collected = load_sketches(run.dir / "sketches")
            ids = [s.client_id for s in collected]
        if len(ids) < 2:  # a single client (or one left after failures): nothing to compare
            affinity = np.zeros((len(ids), len(ids)))
        else:
            estimator = load_class(config.strategies.affinity, "strategies.affinity")(config)
            affinity = np.asarray(estimator.estimate(collected), dtype=np.float64)
        if affinity.shape != (len(ids), len(ids)) or not np.isfinite(affinity).all():
            raise DataError(
                f"{config.strategies.affinity} returned an affinity of shape {affinity.shape} for {len(ids)} clients"
            )
    clustering = load_class(config.strategies.clustering, "strategies.clustering")(config)
    labels = np.asarray(clustering.group(affinity, ids))
    if labels.shape != (len(ids),):
        raise DataError(f"{config.strategies.clustering} returned {labels.shape} labels for {len(ids)} clients")
    labels = canonical_labels(labels)
    if affinity is not None:
        np.save(run.dir / "affinity.npy", affinity)
        affinity_heatmap(affinity, labels, ids, run.dir / "affinity.png")
    without_sketch = sorted(set(fed.client_ids) - set(ids))
    if without_sketch:
        sizes = np.bincount(labels)
        largest = int(np.argmax(sizes))  # argmax: the lowest group number among ties
        console.log(f"{len(without_sketch)} clients without a sketch join the largest group, {largest}")
        ids = [*ids, *without_sketch]
        labels = np.concatenate([labels, np.full(len(without_sketch), largest)])
    groups = _groups(labels.tolist(), ids)
    write_json(
        run.dir / "groups.json",
        {
            "clients": ids,
            "labels": labels.tolist(),
            "groups": [groups[g] for g in sorted(groups)],
            "without_sketch": without_sketch,
        },
    )
    run.info.update(labels=labels.tolist(), client_ids=ids)
    run.log({"phase": "groups", "num_groups": len(groups), "sizes": [len(groups[g]) for g in sorted(groups)]})
    console.log(f"{len(groups)} groups of sizes {[len(groups[g]) for g in sorted(groups)]}")


def _groups(labels: Sequence[int], ids: Sequence[str]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for client, g in zip(ids, labels, strict=True):
        groups.setdefault(int(g), []).append(client)
    return groups


def _train(run: PipelineRun, fed: Federation, groups: dict[int, list[str]]) -> None:
    config, snap = run.config, run.snapshot
    arrays = {g: snap.adapters.get(f"group-{g}", fed.theta_star) for g in groups}
    strategies = snap.objects.get("strategies") or {g: make_aggregation(config) for g in groups}
    every, patience = config.train.validation_every, config.train.patience

    def on_round(rnd: int, new: dict[int, AdapterState], metrics: dict[str, Any]) -> bool:
        snap.adapters.update({f"group-{g}": state for g, state in new.items()})
        snap.objects["strategies"] = strategies
        run.info["train_round"] = rnd
        record = {"phase": "train", **metrics}
        if every and (rnd % every == 0 or rnd == config.train.rounds):
            own = {c: {g: GroupAdapters(new[g])} for g, members in groups.items() for c in members}
            per_client, _ = EnsembleEvaluation(fed).run(
                f"round {rnd}: validation", "validation", own, {c: [1.0] for c in own}
            )
            loss = _mean(per_client, "loss")
            record.update(validation_loss=loss, validation_accuracy=_mean(per_client, "accuracy"))
            best = run.info.setdefault("validation_best", [float("inf"), 0])  # [lowest loss, evaluations since]
            best[:] = [loss, 0] if loss < best[0] else [best[0], best[1] + 1]
            console.log(f"round {rnd}: validation loss {loss:.4f} (best {best[0]:.4f})")
            if patience and best[1] >= patience:
                run.info["train_stopped"] = rnd
                console.log(f"training stops at round {rnd}: no better validation loss in {patience} evaluations")
        run.log(record)
        run.save()
        return "train_stopped" in run.info

    first = int(run.info.get("train_round", 0)) + 1
    last = int(run.info.get("train_stopped", config.train.rounds))
    arrays = GroupTraining(fed, "train").run(groups, arrays, strategies, first, last, on_round)
    for g, state in arrays.items():
        snap.adapters[f"group-{g}"] = state
        save_peft_adapter(state, config.adapter, config.model.name, group_adapter_dir(run.dir, g))
    snap.objects.pop("strategies", None)


def _group_losses(
    fed: Federation, groups: Mapping[int, Sequence[str]], ensemble: Mapping[int, GroupAdapters], label: str
) -> tuple[dict[int, float], dict[str, BoostReply], Exchange]:
    """Each group's training loss under its current ensemble (its clients' targets pooled).

    Asked with ``query.boost``, so the same replies carry each client's residuals under that
    ensemble: the next first-order boosting step of a group needs no exchange of its own.
    """
    replies, result = query_boost(fed, {c: ensemble[g] for g, members in groups.items() for c in members}, label)
    losses = {}
    for g, members in groups.items():
        rows = [replies[c] for c in members if c in replies]
        total = sum(r.targets for r in rows)
        losses[g] = sum(r.loss * r.targets for r in rows) / total if total else float("inf")
    return losses, replies, result


def _boost(
    run: PipelineRun, fed: Federation, groups: dict[int, list[str]], ensemble: dict[int, GroupAdapters]
) -> dict[int, GroupAdapters]:
    """Boosting: add adapters to the group with the highest training loss while that loss drops."""
    config, info = run.config, run.info
    bc = config.boost
    records: list[dict[str, Any]] = info.setdefault("boosts", [])
    if bc.steps == 0:
        return ensemble
    known: dict[str, BoostReply] = {}  # residuals under each group's current ensemble, from the last loss check
    if "group_train_loss" not in info:
        losses, known, initial = _group_losses(fed, {g: groups[g] for g in groups}, ensemble, "group train loss")
        info["group_train_loss"] = {str(g): v for g, v in losses.items()}
        run.log({"phase": "boost", "group_train_loss": info["group_train_loss"], **exchange_metrics(initial)})
        run.save()
    losses = {int(g): v for g, v in info["group_train_loss"].items()}
    while len(records) < bc.steps and not info.get("boost_stopped", False):
        step = len(records) + 1
        g = max(losses, key=lambda k: losses[k])
        console.log(f"boosting step {step}/{bc.steps}: group {g} (train loss {losses[g]:.4f}), {bc.variant}")
        result: Exchange | None = None
        if bc.variant == "first-order":
            folder = run.dir / "sketches"
            sketches = {s.client_id: s for s in load_sketches(folder)} if folder.exists() else {}
            adapter, result = first_order_boost(fed, groups[g], ensemble[g], sketches, known)
        else:

            def log_round(rnd: int, new: dict[int, AdapterState], metrics: dict[str, Any], step: int = step) -> None:
                run.log({"phase": "boost-train", "step": step, **metrics})

            trained = GroupTraining(fed, f"boost {step}", objective="boost").run(
                {g: groups[g]},
                {g: fed.theta_star},
                {g: make_aggregation(config)},
                1,
                bc.rounds,
                log_round,
                {g: ensemble[g]},
            )
            adapter = trained[g]
        candidate = GroupAdapters(ensemble[g].base, [*ensemble[g].boosts, adapter])
        after, checked, check = _group_losses(fed, {g: groups[g]}, {g: candidate}, f"boost {step}: train loss")
        kept = after[g] < losses[g]
        record = {"step": step, "group": g, "train_loss_before": losses[g], "train_loss_after": after[g], "kept": kept}
        run.log({"phase": "boost", **record, **exchange_metrics(result or check)})
        if kept:
            ensemble[g] = candidate
            known.update(checked)
            t = len(candidate.boosts) - 1
            run.snapshot.adapters[f"boost-{g}-{t}"] = adapter
            save_peft_adapter(adapter, config.adapter, config.model.name, boost_adapter_dir(run.dir, step, g))
            losses[g] = after[g]
            info["group_train_loss"][str(g)] = after[g]
        else:
            info["boost_stopped"] = True
            console.log(f"boosting stops: group {g}'s training loss did not drop ({losses[g]:.4f} -> {after[g]:.4f})")
        records.append(record)
        run.save()
    return ensemble


def _final_report(
    run: PipelineRun, fed: Federation, groups: dict[int, list[str]], ensemble: dict[int, GroupAdapters]
) -> dict[str, Any]:
    """Test loss and accuracy per client: the ensemble, the client's own group, and theta* (no training).

    One ``evaluate`` exchange: each client computes every group's output once and reports
    the weighted combination, each group alone, and theta*.
    """
    weights = run.info["weights"]
    clients = sorted(weights)
    finetune = run.config.train.finetune_steps
    if finetune and len(ensemble) > 1:
        raise ConfigError(
            "train.finetune_steps (MTL-FT) needs a single group: strategies.clustering = 'strategies.baselines:OneGroup'"
        )
    group_of = {c: g for g, members in groups.items() for c in members}
    # Each client evaluates the groups it weighs and its own: a group of weight exactly 0
    # changes nothing in its prediction, and evaluating it would cost a pass per group.
    sent = {c: [g for g, w in zip(ensemble, weights[c], strict=True) if w != 0 or g == group_of[c]] for c in clients}
    test, result = EnsembleEvaluation(fed).run(
        "test",
        "test",
        {c: {g: ensemble[g] for g in sent[c]} for c in clients},
        {c: [w for g, w in zip(ensemble, weights[c], strict=True) if g in sent[c]] for c in clients},
        with_base=True,
        finetune_steps=finetune,
    )
    own = {
        c: {
            "loss": r["group_loss"][sent[c].index(group_of[c])],
            "accuracy": r["group_accuracy"][sent[c].index(group_of[c])],
        }
        for c, r in test.items()
    }
    base = {c: {"loss": r["base_loss"], "accuracy": r["base_accuracy"]} for c, r in test.items()}
    run.log({"phase": "test", "test_loss": _mean(test, "loss"), **exchange_metrics(result)})
    rejected: Counter[str] = Counter()
    for line in (run.dir / "metrics.jsonl").read_text().splitlines():
        rejected.update(json.loads(line).get("rejected", {}))
    rows = [
        {
            "client_id": c,
            "group": group_of[c],
            "test_loss": test[c]["loss"],
            "test_accuracy": test[c]["accuracy"],
            "test_targets": test[c]["num-examples"],
            "own_group_test_loss": own[c]["loss"],
            "own_group_test_accuracy": own[c]["accuracy"],
            "base_test_loss": base[c]["loss"],
            "base_test_accuracy": base[c]["accuracy"],
            "weights": dict(zip([str(g) for g in ensemble], weights[c], strict=True)),
        }
        for c in clients
        if c in test
    ]
    return {
        "run_dir": str(run.dir),
        "clients": rows,
        "average": {
            "ensemble": {"test_loss": _mean(test, "loss"), "test_accuracy": _mean(test, "accuracy")},
            "own_group": {"test_loss": _mean(own, "loss"), "test_accuracy": _mean(own, "accuracy")},
            "base_model": {"test_loss": _mean(base, "loss"), "test_accuracy": _mean(base, "accuracy")},
        },
        "num_clients": len(rows),
        "unanswered": sorted(set(clients) - set(test)),
        "rejected_updates": dict(rejected),
        "num_groups": len(groups),
        "group_sizes": {str(g): len(m) for g, m in sorted(groups.items())},
        "boosts": run.info.get("boosts", []),
        "config": run.config.to_flat(),
    }


def _mean(per_client: Mapping[str, Mapping[str, Any]], key: str) -> float:
    """The unweighted mean over clients (every client counts once, as in the paper)."""
    values = [float(v[key]) for v in per_client.values()]
    return float(np.mean(values)) if values else float("nan")


def _markdown(report: dict[str, Any]) -> str:
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
    lines += [f"| {p} | {report['seconds'][p]:.1f} |" for p in PHASES if p in report["seconds"]]
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


def _print_summary(report: dict[str, Any], run_dir: Path) -> None:
    console.print(f"EnsembleLoRA: {report['num_clients']} clients, {report['num_groups']} groups")
    table = Table()
    table.add_column("model")
    table.add_column("test loss", justify="right")
    table.add_column("test accuracy", justify="right")
    for name, key in (("base model", "base_model"), ("own group", "own_group"), ("ensemble", "ensemble")):
        avg = report["average"][key]
        table.add_row(name, f"{avg['test_loss']:.4f}", f"{avg['test_accuracy']:.4f}")
    console.print(table)
    console.print("phases: " + ", ".join(f"{p} {report['seconds'][p]:.0f} s" for p in PHASES if p in report["seconds"]))
    console.print(f"written to {run_dir}")
