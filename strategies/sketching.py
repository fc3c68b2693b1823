"""The sketch phase: every client's sketch of its train and validation samples, or its statistics.

What a client sends depends on ``affinity.mode``: in exact mode its ``ClientSketch`` (saved
under ``sketches/``), in private mode its ``ClientStatistics`` (``statistics.npz``), in
secure mode nothing here (its statistics stay on the client for the SecAgg+ rounds of the
grouping phase). Clients that fail are left out; the grouping phase assigns them a group.
A clustering that needs no affinity (``needs_affinity = False``: the baselines) skips it.
"""

from __future__ import annotations

from clients.records import sketch_from_record, statistics_from_record
from elora_fed.statistics import save_statistics
from strategies.federation import Federation
from strategies.messaging import exchange_metrics
from strategies.phase import Request, Steps, load_class
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
        mode = fed.config.affinity.mode
        if mode == "private":
            records = (statistics_from_record(r.content, fed.config.sketch.dim) for r in result.replies)
            stats = sorted(records, key=lambda item: item[0])
            if stats:
                save_statistics(run.dir / "statistics.npz", [c for c, _ in stats], [s for _, s in stats])
        elif mode != "secure":
            for sketch in sorted((sketch_from_record(r.content) for r in result.replies), key=lambda s: s.client_id):
                sketch.save(run.dir / "sketches")
        run.log({"phase": "sketch", **exchange_metrics(result)})
