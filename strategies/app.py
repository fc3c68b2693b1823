"""The ServerApp: the federated EnsembleLoRA pipeline (``strategies.pipeline``).

``flwr run .`` reads the config from ``[tool.flwr.app.config]`` plus ``--run-config``
(``preset='demo'`` applies a preset beneath the keys it changes: ``config.from_run_config``);
``elora-fed run`` builds the same app around an already resolved config (``server_app``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from elora_fed.config import RunConfig, from_run_config
from strategies.pipeline import run_pipeline


def server_app(config: RunConfig | None = None) -> ServerApp:
    """The ServerApp, configured by ``config`` or else by the run config Flower passes."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_pipeline(grid, config or from_run_config(context.run_config))

    return app


app = server_app()
