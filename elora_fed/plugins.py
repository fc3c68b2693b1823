"""User classes named in the config: ``package.module:Class`` or ``path/to/file.py:Class``.

Phases, affinity modes, estimators, clusterings and aggregation strategies are all named
this way, so a user's extension is one class in one file, with no package to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any

from elora_fed.errors import ConfigError


def load_class(path: str, key: str) -> type[Any]:
    """The class named by ``package.module:Class`` or ``path/to/file.py:Class``.

    ConfigError naming ``key`` if it cannot be loaded.
    """
    module_name, _, name = path.rpartition(":")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None:
                raise ImportError(f"no Python file at {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        cls = getattr(module, name)
    except (ImportError, AttributeError, OSError) as e:
        raise ConfigError(f"config key '{key}' = {path!r} cannot be loaded: {e}") from e
    if not inspect.isclass(cls):
        raise ConfigError(f"config key '{key}' = {path!r} is not a class")
    return cls
