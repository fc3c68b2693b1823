"""The state of one pipeline run: its directory, metrics log and checkpoint, created new or reopened to resume.

Phases read what earlier phases left here (``groups``, ``ensemble``, ``info``) and write
their own results back, so a run killed at any checkpoint resumes from its directory alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from elora_fed.checkpoint import Checkpoint, Snapshot, group_ensembles
from elora_fed.config import RunConfig
from elora_fed.ensemble.outputs import GroupAdapters
from elora_fed.run_dir import create_run_dir, saved_config
from strategies.messaging import console


class RunState:
    """A run directory with its metrics log and checkpoint; ``info`` is the checkpointed JSON state."""

    def __init__(self, config: RunConfig) -> None:
        if config.resume:
            self.dir = Path(config.resume)
            self.config = saved_config(self.dir)  # the run's own config; only `resume` comes from this launch
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
        """Book ``phase``'s wall time since ``started``, mark it done and checkpoint."""
        seconds = self.info["seconds"]
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started
        self.info["done"].append(phase)
        self.save()
        console.log(f"[bold]{phase}[/bold] done in {seconds[phase]:.1f} s")

    def groups(self) -> dict[int, list[str]]:
        """The grouping phase's groups: group number -> its clients, in grouping order."""
        groups: dict[int, list[str]] = {}
        for client, g in zip(self.info["client_ids"], self.info["labels"], strict=True):
            groups.setdefault(int(g), []).append(client)
        return groups

    def ensemble(self) -> dict[int, GroupAdapters]:
        """Each group's adapters so far: its trained adapter, then the boosting adapters it kept."""
        return group_ensembles(self.snapshot, self.groups())

    def _truncate_metrics(self, lines: int) -> None:
        path = self.dir / "metrics.jsonl"
        if path.exists():
            kept = path.read_text().splitlines(keepends=True)[:lines]
            path.write_text("".join(kept))
