"""The sketch phase: every client's sketch of its train and validation samples, or its statistics.

What a client sends is its affinity mode's release (``elora_fed.surrogate.affinity_modes``): a
``ClientSketch`` (saved under ``sketches/``) or ``ClientStatistics`` (``statistics.npz``);
in a secure mode nothing here (the release stays on the client for the SecAgg+ rounds of
the grouping phase). Clients that fail are left out; the grouping phase assigns them a group.
A clustering that needs no affinity (``needs_affinity = False``: the baselines) skips it.
"""

from __future__ import annotations

from operator import itemgetter

from clients.records import release_from_record
from elora_fed.errors import DataError
from elora_fed.plugins import load_class
from elora_fed.sketch.client_sketch import ClientSketch
from elora_fed.surrogate.affinity_modes import affinity_mode
from elora_fed.surrogate.statistics import ClientStatistics, save_statistics
from strategies.federation import Federation
from strategies.messaging import exchange_metrics
from strategies.phase import Request, Steps
from strategies.run_state import RunState


def needs_affinity(run: RunState) -> bool:
    """Whether the configured clustering uses an affinity (and so the sketches)."""
    clustering = load_class(run.config.strategies.clustering, "strategies.clustering")
    return bool(getattr(clustering, "needs_affinity", True))


class SketchPhase:
    """Ask every client for its sketch (``query.sketch``) and keep what its affinity mode releases."""

    def __init__(self, run: RunState, fed: Federation) -> None:
        self.run, self.fed = run, fed

    def steps(self) -> Steps[None]:
        if not needs_affinity(self.run):
            return
        fed, run = self.fed, self.run
        result = yield Request(fed.requests(fed.client_ids, "query.sketch", {}), "sketch")
        if not affinity_mode(fed.config).secure_aggregation:
            releases = sorted(
                (release_from_record(r.content, fed.config.sketch.dim) for r in result.replies), key=itemgetter(0)
            )
            stats = [(c, s) for c, s in releases if isinstance(s, ClientStatistics)]
            if stats and len(stats) < len(releases):
                raise DataError(
                    "the sketch phase's replies mix sketches and statistics: one affinity mode releases one"
                )
            if stats:
                save_statistics(run.dir / "statistics.npz", [c for c, _ in stats], [s for _, s in stats])
            for _, sketch in releases:
                if isinstance(sketch, ClientSketch):
                    sketch.save(run.dir / "sketches")
        run.log({"phase": "sketch", **exchange_metrics(result)})
