"""The federated EnsembleLoRA pipeline: the phases in order, one run directory, a checkpoint after each.

Phases (``strategies.phase`` protocol), each named by a dotted path in ``strategies.*``:
sketch, groups (affinity and clustering), train (per-group federated training), boost,
weights (learned on validation), test. This module waits for the nodes, runs each phase
not yet done through ``drive`` and checkpoints after it, then writes the report
(``strategies.report``). With every random choice seeded by (seed, phase, group, round),
``resume`` continues a killed run and reproduces the uninterrupted result.

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

import functools
import logging
import time
from pathlib import Path

from flwr.serverapp import Grid

from elora_fed.config import RunConfig
from elora_fed.data.config import DataConfig
from elora_fed.errors import DataError
from elora_fed.model.config import ModelConfig
from elora_fed.plugins import load_class
from elora_fed.privacy.mechanism import describe, privacy_report
from elora_fed.run_dir import write_json
from elora_fed.surrogate.affinity_modes import affinity_mode
from strategies.federation import discover, wait_for_nodes
from strategies.ledger import Ledger
from strategies.messaging import console
from strategies.phase import Phase, drive
from strategies.report import build_report, markdown, print_summary
from strategies.run_state import RunState
from strategies.sketching import needs_affinity

PHASES = ("sketch", "groups", "train", "boost", "weights", "test")
"""The phase slots in order; ``strategies.<slot>`` names each slot's class."""


def run_pipeline(grid: Grid, config: RunConfig) -> Path:
    """Run (or resume) the whole pipeline on ``grid``; returns the run directory.

    The run directory's ``status.json`` says ``running``, ``finished`` or ``failed`` (with
    the error): what a script checks, since ``flwr run --stream`` exits 0 either way.
    """
    logging.getLogger("flwr").setLevel(logging.WARNING)  # concise logs: the phases report progress
    run = RunState(config)
    write_json(run.dir / "status.json", {"state": "running", "started": time.time()})
    try:
        _run_phases(grid, run)
    except BaseException as e:
        write_json(run.dir / "status.json", {"state": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    write_json(run.dir / "status.json", {"state": "finished", "finished": time.time()})
    return run.dir


def phase_classes(config: RunConfig) -> dict[str, type[Phase]]:
    """Each slot's phase class, loaded from ``strategies.<slot>`` (ConfigError naming a bad one)."""
    return {slot: load_class(getattr(config.strategies, slot), f"strategies.{slot}") for slot in PHASES}


def _run_phases(grid: Grid, run: RunState) -> None:
    config = run.config
    console.log(f"run directory {run.dir}")
    classes = phase_classes(config)
    expected = config.federation.num_nodes or count_clients(config.data, config.model)
    ledger = Ledger(run.info.setdefault("ledger", {}))
    fed = discover(grid, config, wait_for_nodes(grid, expected, config.federation.wait_s), ledger)
    write_json(run.dir / "clients.json", [{"client_id": c, **fed.samples[c]} for c in fed.client_ids])
    privacy = privacy_report(
        config, affinity_mode(config), releases=int(needs_affinity(run))
    )  # one sketch-phase release per client
    if config.privacy.enabled:
        console.log(describe(privacy))
    for slot, cls in classes.items():
        if not run.done(slot):
            started = time.perf_counter()
            fed.phase = slot
            drive(cls(run, fed).steps(), fed)
            run.complete(slot, started)
        if slot == "groups" and sorted(run.info["client_ids"]) != fed.client_ids:
            raise DataError("the federation's clients differ from the ones this run was grouped for")
    accounting = ledger.summary(fed.model_size, run.info["seconds"])
    write_json(run.dir / "accounting.json", accounting)
    report = build_report(run, PHASES, dict(accounting["total"]), privacy)
    write_json(run.dir / "report.json", report)
    (run.dir / "report.md").write_text(markdown(report))
    print_summary(report, run.dir)


@functools.lru_cache(maxsize=4)
def count_clients(data: DataConfig, model: ModelConfig) -> int:
    """How many clients the data config selects (loaded once per process: the CLI and the server share it)."""
    from elora_fed.data.federated_data import load_clients
    from elora_fed.model.models import load_tokenizer

    return len(load_clients(data, load_tokenizer(model)))
