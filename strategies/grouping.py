"""The grouping phase: task affinity from what the sketch phase collected, then groups by clustering.

Both steps are replaceable by dotted path (``strategies.affinity``, ``strategies.clustering``):
- an affinity estimator: ``Class(config)`` with ``estimate(collected) -> (n, n) array``,
  higher meaning "training together helps", where ``collected`` is the clients' releases
  in client order (sketches or statistics, as the ``affinity.mode`` releases; a
  ``SubsetSums`` in a secure mode); ``SurrogateAffinity``, the mode's own estimate, is the default;
- a clustering: ``Class(config)`` with ``group(affinity, client_ids) -> labels`` (n ints,
  groups numbered from 0; ``AffinityClustering`` is the default). A clustering with
  ``needs_affinity = False`` gets ``None`` and the sketch phase is skipped.

Clients without a sketch (they failed the sketch phase) join the largest group, the adapter
trained on the most clients (ties: the lowest group number).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from elora_fed.config import RunConfig
from elora_fed.errors import DataError
from elora_fed.grouping.clustering import cluster_clients, groups_record
from elora_fed.grouping.partitions import canonical_labels
from elora_fed.plots import affinity_heatmap
from elora_fed.plugins import load_class
from elora_fed.run_dir import write_json
from elora_fed.sketch.client_sketch import ClientSketch, load_sketches
from elora_fed.surrogate.affinity import remove_offsets
from elora_fed.surrogate.affinity_modes import Collected, affinity_mode
from elora_fed.surrogate.statistics import ClientStatistics, load_statistics
from strategies.federation import Federation
from strategies.messaging import console
from strategies.phase import Steps
from strategies.run_state import RunState
from strategies.secure_statistics import SecureStatistics
from strategies.sketching import needs_affinity


class SurrogateAffinity:
    """The affinity mode's estimate (``affinity.mode``), without per-task offsets if ``affinity.offsets = "remove"``.

    ``estimate`` gets what the sketch phase collected, in client order: the mode's releases
    (``ClientSketch``es or ``ClientStatistics``), or in a secure mode a ``SubsetSums`` that
    sums each subset by secure aggregation (``strategies.secure_statistics.SecureStatistics``).
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config.affinity
        self.mode = affinity_mode(config)

    def estimate(self, collected: Collected) -> np.ndarray:
        affinity = self.mode.estimate(collected)
        n = affinity.shape[0]
        return remove_offsets(affinity) if self.config.offsets == "remove" and n >= 3 else affinity


class AffinityClustering:
    """Groups maximizing average within-group affinity (``clustering.*``): the SDP relaxation, solved
    in low rank (Burer-Monteiro, ``method = "fast"``) by default or exactly by cvxpy, or the spectral baseline."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config.clustering
        self.seed = config.seed

    def group(self, affinity: np.ndarray, client_ids: Sequence[str]) -> np.ndarray:
        return cluster_clients(affinity, self.config, self.seed)


class GroupingPhase:
    """Affinity, clustering, the late joiners; writes ``affinity.npy``, ``affinity.png`` and ``groups.json``."""

    def __init__(self, run: RunState, fed: Federation) -> None:
        self.run, self.fed = run, fed

    def steps(self) -> Steps[None]:
        run, fed, config = self.run, self.fed, self.run.config
        ids, affinity = self._affinity(fed.client_ids) if needs_affinity(run) else (fed.client_ids, None)
        clustering = load_class(config.strategies.clustering, "strategies.clustering")(config)
        labels = np.asarray(clustering.group(affinity, ids))
        if labels.shape != (len(ids),):
            raise DataError(f"{config.strategies.clustering} returned {labels.shape} labels for {len(ids)} clients")
        labels = canonical_labels(labels)
        if affinity is not None:
            np.save(run.dir / "affinity.npy", affinity)
            affinity_heatmap(affinity, labels, ids, run.dir / "affinity.png")
        without_sketch = sorted(set(fed.client_ids) - set(ids))
        if without_sketch:
            largest = int(np.argmax(np.bincount(labels)))  # argmax: the lowest group number among ties
            console.log(f"{len(without_sketch)} clients without a sketch join the largest group, {largest}")
            ids = [*ids, *without_sketch]
            labels = np.concatenate([labels, np.full(len(without_sketch), largest)])
        run.info.update(labels=labels.tolist(), client_ids=ids)
        groups = run.groups()
        write_json(run.dir / "groups.json", {**groups_record(ids, labels), "without_sketch": without_sketch})
        sizes = [len(groups[g]) for g in sorted(groups)]
        run.log({"phase": "groups", "num_groups": len(groups), "sizes": sizes})
        console.log(f"{len(groups)} groups of sizes {sizes}")
        yield from ()  # no request of its own: secure mode's SecAgg+ rounds run in Flower's workflow

    def _affinity(self, ids: list[str]) -> tuple[list[str], np.ndarray]:
        """The clients the estimator has data for, and their affinity."""
        run, config = self.run, self.run.config
        collected: list[ClientSketch] | list[ClientStatistics] | SecureStatistics
        if affinity_mode(config).secure_aggregation:  # every client, even one that missed the sketch phase
            collected = SecureStatistics(self.fed, ids)
        elif (run.dir / "statistics.npz").exists():
            ids, collected = load_statistics(run.dir / "statistics.npz")
        else:
            collected = load_sketches(run.dir / "sketches")
            ids = [s.client_id for s in collected]
        if len(ids) < 2:  # a single client (or one left after failures): nothing to compare
            return ids, np.zeros((len(ids), len(ids)))
        estimator = load_class(config.strategies.affinity, "strategies.affinity")(config)
        affinity = np.asarray(estimator.estimate(collected), dtype=np.float64)
        if affinity.shape != (len(ids), len(ids)) or not np.isfinite(affinity).all():
            raise DataError(
                f"{config.strategies.affinity} returned an affinity of shape {affinity.shape} for {len(ids)} clients"
            )
        return ids, affinity
