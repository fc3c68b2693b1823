"""One directory per run, holding its resolved config, metrics and artifacts."""

from __future__ import annotations

import json
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
