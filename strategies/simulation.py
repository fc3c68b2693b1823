"""Running the app on Flower's simulation engine on Ray, from a resolved config (``elora-fed run``).

One simulated SuperNode per client (``partition-id`` = the client's index). The ServerApp is
built around the resolved config, which every request carries to the clients, so presets,
``--set`` overrides and resumed runs reach every node. ``federation.ray_address`` attaches
to a running Ray cluster (``ray start --head``) instead of starting a local one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from elora_fed.config import RunConfig
from elora_fed.errors import EloraFedError
from elora_fed.plugins import load_class
from strategies.messaging import error_gist
from strategies.pipeline import count_clients, run_pipeline


class _OneLineClientErrors(logging.Filter):
    """Flower's simulation engine logs each client error twice with Ray's whole traceback: keep one line.

    The exchange summary (``strategies.messaging``) reports the failures anyway; with
    dropout (``federation.drop_rate``) the tracebacks would bury every other line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.endswith("vce_api.py") or record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if text.startswith("Traceback"):
            return False
        record.msg, record.args = f"client error: {error_gist(text)}", ()
        return True


def simulate(config: RunConfig, client_app: ClientApp | None = None) -> Path:
    """Run (or resume) the pipeline with one simulated node per client; returns the run directory.

    ``client_app`` replaces ``clients.app.app`` (e.g. the same handlers with extra mods).
    """
    from flwr.simulation import run_simulation

    if client_app is None:
        from clients.app import app as client_app

    for key in ("strategies.affinity", "strategies.clustering", "train.aggregation"):
        load_class(config.to_flat()[key], key)  # fail before Ray starts, not in the middle of a run
    fed = config.federation
    num_nodes = fed.num_nodes or count_clients(config.data, config.model)
    backend: dict[str, Any] = {"client_resources": {"num_cpus": fed.cpus_per_client, "num_gpus": fed.gpus_per_client}}
    if fed.ray_address:
        backend["init_args"] = {"address": fed.ray_address}
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Worker processes inherit this: library deprecation notices, once per actor, bury the progress lines.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    logging.getLogger("flwr").addFilter(_OneLineClientErrors())
    outcome: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["run_dir"] = run_pipeline(grid, config)
        except BaseException as e:  # re-raised below: the simulation engine would only log it
            outcome["error"] = e

    run_simulation(app, client_app, num_supernodes=num_nodes, backend_config=backend)  # type: ignore[arg-type]
    if "error" in outcome:
        raise outcome["error"]
    if "run_dir" not in outcome:
        raise EloraFedError("the simulation ended before the pipeline finished (see the log above)")
    return Path(outcome["run_dir"])
