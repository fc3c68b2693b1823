"""A worked example of replacing a strategy: group Shakespeare roles by play instead of by affinity.

The affinity estimator and the clustering named in the config's ``strategies`` section are
classes built as ``Class(config)`` (the resolved ``RunConfig``); whole phases are built as
``Class(run, fed)`` instead (``experiments/custom_phase.py``). A clustering provides ``group(affinity, client_ids)`` and
returns one group label per client (ints from 0, in ``client_ids`` order); an affinity
estimator provides ``estimate(sketches)`` and returns an (n, n) array. Use this one with

    elora-fed run --preset demo --set strategies.clustering=experiments/custom_strategy.py:PlayClustering

or, for ``flwr run .``, ``--run-config "strategies.clustering='experiments/custom_strategy.py:PlayClustering'"``.
The affinity matrix is still estimated and saved (its heatmap then shows how well plays
match the measured affinity). Aggregation is replaced the same way with any Flower
strategy class, e.g. ``--set train.aggregation=flwr.serverapp.strategy:FedProx``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from elora_fed.config import RunConfig


class PlayClustering:
    """One group per play: client ids are ``play:ROLE``, so roles of the same play train together."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def group(self, affinity: np.ndarray, client_ids: Sequence[str]) -> np.ndarray:
        plays = sorted({client.split(":", 1)[0] for client in client_ids})
        return np.array([plays.index(client.split(":", 1)[0]) for client in client_ids])
