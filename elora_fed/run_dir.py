"""One directory per run, holding its resolved config, metrics and artifacts."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from elora_fed.config import RunConfig


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


def write_json(path: Path, payload: Any) -> None:
    """Write JSON via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# A pipeline run's adapters, as peft directories under ``adapters/``: written by
# ``strategies.pipeline``, read back by ``elora_fed.inference``.
_BOOST_ADAPTER = re.compile(r"boost-(\d+)-group-(\d+)")


def group_adapter_dir(run_dir: Path, group: int) -> Path:
    """Where group ``group``'s trained adapter is saved."""
    return run_dir / "adapters" / f"group-{group}"


def boost_adapter_dir(run_dir: Path, step: int, group: int) -> Path:
    """Where the adapter that boosting step ``step`` added to group ``group`` is saved."""
    return run_dir / "adapters" / f"boost-{step}-group-{group}"


def boost_adapter_dirs(run_dir: Path) -> dict[int, list[Path]]:
    """Each group's saved boosting adapters, in step order."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in (run_dir / "adapters").iterdir():
        match = _BOOST_ADAPTER.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), []).append((int(match[1]), path))
    return {g: [p for _, p in sorted(steps)] for g, steps in found.items()}
