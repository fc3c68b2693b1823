"""One directory per run, holding its resolved config, metrics and artifacts."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from elora_fed.config import RunConfig
from elora_fed.errors import ConfigError, DataError


def create_run_dir(config: RunConfig, job: str) -> Path:
    """Make ``<run_dir>/<job>-<UTC timestamp>`` and write the resolved config into it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root = Path(config.run_dir)
    path = root / f"{job}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{job}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    write_json(path / "config.json", config.to_flat())
    return path


def saved_config(run_dir: Path) -> RunConfig:
    """The config a run directory was started with, set to resume it (ConfigError if it is not a run directory)."""
    saved = Path(run_dir) / "config.json"
    if not saved.exists():
        raise ConfigError(f"resume = {str(run_dir)!r} is not a run directory: it has no config.json")
    return RunConfig.from_flat({**json.loads(saved.read_text()), "resume": str(run_dir)})


def write_json(path: Path, payload: Any) -> None:
    """Write JSON via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# A pipeline run's adapters, as peft directories under ``adapters/``: written by
# ``strategies.pipeline``, read back by ``elora_fed.ensemble.inference``.
_BOOST_ADAPTER = re.compile(r"group-(\d+)-boost-(\d+)")


def adapter_name(group: int, boost: int | None = None) -> str:
    """The one name of group ``group``'s adapter, or of its ``boost``-th boosting adapter (from 0).

    ``group-<g>`` and ``group-<g>-boost-<t>``: the key in the checkpoint and the directory
    under ``adapters/`` alike.
    """
    return f"group-{group}" if boost is None else f"group-{group}-boost-{boost}"


def adapter_dir(run_dir: Path, group: int, boost: int | None = None) -> Path:
    """Where ``adapter_name(group, boost)`` is saved as a peft adapter."""
    return run_dir / "adapters" / adapter_name(group, boost)


def boost_adapter_dirs(run_dir: Path) -> dict[int, list[Path]]:
    """Each group's saved boosting adapters, in order; DataError for a run directory of the old layout."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in (run_dir / "adapters").iterdir():
        if path.name.startswith("boost-"):
            raise DataError(
                f"{path} is a boosting adapter in an older elora-fed layout (boost-<step>-group-<g>): rename each to "
                "group-<g>-boost-<t>, t counting the group's boosting adapters from 0 in step order"
            )
        match = _BOOST_ADAPTER.fullmatch(path.name)
        if match:
            found.setdefault(int(match[1]), []).append((int(match[2]), path))
    return {g: [p for _, p in sorted(boosts)] for g, boosts in found.items()}
