"""A pipeline run's checkpoint: what is done, and the adapters and server state to continue from.

A snapshot is a directory ``checkpoint/step-NNNN/`` holding one safetensors file per named
adapter and the pickled server-side objects (aggregation strategies with their optimizer
state), written atomically; then ``checkpoint/state.json`` (small JSON: completed phases,
round counters, groups, weights) is atomically replaced to point at it, and older snapshots
are deleted. A run killed at any moment leaves the last complete snapshot in place.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elora_fed.ensemble.outputs import GroupAdapters
from elora_fed.errors import DataError
from elora_fed.model.adapters import AdapterState
from elora_fed.paths import atomic_directory
from elora_fed.run_dir import adapter_name, write_json


@dataclass
class Snapshot:
    """The state to continue from: JSON-able ``info``, named adapters and pickled ``objects``."""

    info: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, AdapterState] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)


def group_ensembles(snapshot: Snapshot, groups: Iterable[int]) -> dict[int, GroupAdapters]:
    """Each group's adapters as checkpointed: ``group-<g>``, then its ``group-<g>-boost-<t>`` in order."""
    ensemble = {}
    for g in groups:
        boosts: list[AdapterState] = []
        while (name := adapter_name(g, len(boosts))) in snapshot.adapters:
            boosts.append(snapshot.adapters[name])
        ensemble[g] = GroupAdapters(snapshot.adapters[adapter_name(g)], boosts)
    return ensemble


class Checkpoint:
    """Saves and loads the latest ``Snapshot`` of the run in ``run_dir``."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / "checkpoint"

    def save(self, snapshot: Snapshot) -> None:
        step = self._latest_step() + 1
        name = f"step-{step:04d}"
        with atomic_directory(self.folder / name) as tmp:
            for key, state in snapshot.adapters.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / f"{key}.safetensors"))
            (tmp / "objects.pkl").write_bytes(pickle.dumps(snapshot.objects))
        write_json(self.folder / "state.json", {"step": step, "snapshot": name, "info": snapshot.info})
        for old in self.folder.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> Snapshot | None:
        """The latest snapshot, or None if the run has none yet."""
        state_file = self.folder / "state.json"
        if not state_file.exists():
            return None
        try:
            state = json.loads(state_file.read_text())
            folder = self.folder / state["snapshot"]
            adapters = {f.stem: load_file(str(f)) for f in sorted(folder.glob("*.safetensors"))}
            objects = pickle.loads((folder / "objects.pkl").read_bytes())
        except (OSError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as e:
            raise DataError(f"the checkpoint in {self.folder} is unreadable: {e}") from e
        return Snapshot(info=state["info"], adapters=adapters, objects=objects)

    def _latest_step(self) -> int:
        state_file = self.folder / "state.json"
        return int(json.loads(state_file.read_text())["step"]) if state_file.exists() else 0
