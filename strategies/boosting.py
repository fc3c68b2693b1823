"""The boosting phase: add adapters to the group with the highest training loss while that loss drops.

Each step picks the group whose clients' pooled training loss under its current ensemble
is highest, fits one more adapter to its residuals, and keeps it if the group's loss
drops; the first step that does not stops boosting (``boost.*``). Two fits:
- ``first-order``: ridge regression of the residuals in sketch space, lifted with the JL
  projection P (no training round); the sketch phase's rows are reused when the affinity
  mode released per-sample rows (``per_sample_rows``), else clients send ridge statistics;
- ``trained``: ``boost.rounds`` federated rounds of a new adapter on the residual objective.
Group g's t-th kept adapter (t from 0) is ``group-<g>-boost-<t>``, in the checkpoint and under ``adapters/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from clients.protocol import number
from clients.records import ensemble_records
from elora_fed.ensemble.boosting import lift, ridge_fit, ridge_statistics
from elora_fed.ensemble.outputs import AdapterState, GroupAdapters
from elora_fed.errors import DataError
from elora_fed.model.adapters import save_peft_adapter
from elora_fed.run_dir import adapter_dir, adapter_name
from elora_fed.sketch.client_sketch import ClientSketch, load_sketches
from elora_fed.sketch.projection import JLProjector
from elora_fed.surrogate.affinity_modes import affinity_mode
from strategies.federation import Federation
from strategies.messaging import Exchange, console, exchange_metrics
from strategies.phase import Request, Steps
from strategies.run_state import RunState
from strategies.training import GroupTraining, make_aggregation


@dataclass(frozen=True)
class BoostReply:
    """One client's answer to ``query.boost``: its train split under one group's current ensemble.

    ``residuals`` r = 1 - p per sample (the boosting targets), ``loss`` the per-target log
    loss over its ``targets`` targets, and, when asked, the ridge statistics of its train
    features (``gram`` G^T G and ``moment`` G^T r).
    """

    residuals: np.ndarray
    loss: float
    targets: int
    gram: np.ndarray | None = None
    moment: np.ndarray | None = None


def query_boost(
    fed: Federation, ensembles: Mapping[str, GroupAdapters], label: str, ridge_statistics: bool = False
) -> Steps[tuple[dict[str, BoostReply], Exchange]]:
    """Ask each client for ``BoostReply`` under the group ensemble given for it (retried like evaluation)."""
    messages = []
    for client, group in sorted(ensembles.items()):
        records: dict[str, ArrayRecord | ConfigRecord] = {
            "options": ConfigRecord({"ridge-statistics": ridge_statistics})
        }
        records.update(ensemble_records({0: group}))
        messages.extend(fed.requests([client], "query.boost", records))
    result = yield Request(messages, label, retries=fed.config.federation.retries)
    replies = {}
    for reply in result.replies:
        client = fed.client_of(reply)
        arrays = {k: v.numpy() for k, v in reply.content.array_records["boost"].items()}
        metrics = reply.content.metric_records["metrics"]
        d = fed.config.sketch.dim
        gram, moment = arrays.get("gram"), arrays.get("moment")
        if "residuals" not in arrays or not np.isfinite(arrays["residuals"]).all():
            raise DataError(f"malformed boosting reply from '{client}': missing or non-finite residuals")
        if ridge_statistics and (
            gram is None
            or moment is None
            or gram.shape != (d, d)
            or moment.shape != (d,)
            or not (np.isfinite(gram).all() and np.isfinite(moment).all())
        ):
            raise DataError(f"malformed boosting reply from '{client}': no valid ridge statistics")
        replies[client] = BoostReply(
            arrays["residuals"], number(metrics, "loss"), int(number(metrics, "targets")), gram, moment
        )
    return replies, result


def group_losses(
    fed: Federation, groups: Mapping[int, Sequence[str]], ensemble: Mapping[int, GroupAdapters], label: str
) -> Steps[tuple[dict[int, float], dict[str, BoostReply], Exchange]]:
    """Each group's training loss under its current ensemble (its clients' targets pooled).

    Asked with ``query.boost``, so the same replies carry each client's residuals under that
    ensemble: the next first-order boosting step of a group needs no exchange of its own.
    """
    targets = {c: ensemble[g] for g, members in groups.items() for c in members}
    replies, result = yield from query_boost(fed, targets, label)
    losses = {}
    for g, members in groups.items():
        rows = [replies[c] for c in members if c in replies]
        total = sum(r.targets for r in rows)
        losses[g] = sum(r.loss * r.targets for r in rows) / total if total else float("inf")
    return losses, replies, result


def first_order_boost(
    fed: Federation,
    members: Sequence[str],
    group: GroupAdapters,
    sketches: Mapping[str, ClientSketch],
    known: Mapping[str, BoostReply] | None = None,
) -> Steps[tuple[AdapterState, Exchange | None]]:
    """A boosting adapter fit in sketch space: ridge regression of the residuals, lifted with P.

    With the sketch phase's train features at hand (exact mode: same theta* and P), only
    residuals are needed: those ``known`` from the group's last loss check (``query_boost``
    under the same ensemble) are used as they are, so no exchange runs (the Exchange is
    then None); otherwise clients are asked for them. Without ``sketches`` (the affinity mode
    released no per-sample rows: private, secure) clients send the additive statistics
    G^T G and G^T r instead, and no per-sample feature leaves them.
    """
    config = fed.config
    have = all(c in sketches for c in members)
    result: Exchange | None = None
    replies = dict(known or {})
    if not have or any(c not in replies for c in members):
        replies, result = yield from query_boost(fed, {c: group for c in members}, "boost", ridge_statistics=not have)
        if not replies:
            raise DataError(f"no client of the group answered the boosting query: {result.failures[:2]}")
    d = config.sketch.dim
    gram, moment = np.zeros((d, d)), np.zeros(d)
    for client in sorted(c for c in members if c in replies):
        reply = replies[client]
        if have:
            features = sketches[client].rows("train")[1]
            if len(features) != len(reply.residuals):
                raise DataError(
                    f"boosting reply from '{client}': {len(reply.residuals)} residuals, {len(features)} samples"
                )
            parts = ridge_statistics(features, reply.residuals)
        else:
            assert reply.gram is not None and reply.moment is not None
            parts = (reply.gram, reply.moment)
        gram += parts[0]
        moment += parts[1]
    w = ridge_fit(gram, moment, config.boost.ridge)
    sk = config.sketch
    p = sum(t.numel() for name, t in fed.theta_star.items() if ".lora_B." in name)
    projector = JLProjector(p, sk.dim, sk.seed, sk.projection, sk.block_rows)
    return lift(fed.theta_star, projector, w), result


class BoostingPhase:
    """Up to ``boost.steps`` boosting steps, checkpointed after each (see the module docstring)."""

    def __init__(self, run: RunState, fed: Federation) -> None:
        self.run, self.fed = run, fed

    def steps(self) -> Steps[None]:
        run, fed, config, info = self.run, self.fed, self.run.config, self.run.info
        bc = config.boost
        groups, ensemble = run.groups(), run.ensemble()
        records: list[dict[str, Any]] = info.setdefault("boosts", [])
        if bc.steps == 0:
            return
        known: dict[str, BoostReply] = {}  # residuals under each group's current ensemble, from the last loss check
        if "group_train_loss" not in info:
            losses, known, initial = yield from group_losses(fed, groups, ensemble, "group train loss")
            info["group_train_loss"] = {str(g): v for g, v in losses.items()}
            run.log({"phase": "boost", "group_train_loss": info["group_train_loss"], **exchange_metrics(initial)})
            run.save()
        losses = {int(g): v for g, v in info["group_train_loss"].items()}
        while len(records) < bc.steps and not info.get("boost_stopped", False):
            step = len(records) + 1
            g = max(losses, key=lambda k: losses[k])
            console.log(f"boosting step {step}/{bc.steps}: group {g} (train loss {losses[g]:.4f}), {bc.variant}")
            result: Exchange | None = None
            if bc.variant == "first-order":
                folder = run.dir / "sketches"
                reuse = folder.exists() and affinity_mode(config).per_sample_rows
                sketches = {s.client_id: s for s in load_sketches(folder)} if reuse else {}
                adapter, result = yield from first_order_boost(fed, groups[g], ensemble[g], sketches, known)
            else:
                adapter = yield from self._trained(step, g, groups[g], ensemble[g])
            candidate = GroupAdapters(ensemble[g].base, [*ensemble[g].boosts, adapter])
            after, checked, check = yield from group_losses(
                fed, {g: groups[g]}, {g: candidate}, f"boost {step}: train loss"
            )
            kept = after[g] < losses[g]
            record = {
                "step": step,
                "group": g,
                "train_loss_before": losses[g],
                "train_loss_after": after[g],
                "kept": kept,
            }
            run.log({"phase": "boost", **record, **exchange_metrics(result or check)})
            if kept:
                ensemble[g] = candidate
                known.update(checked)
                t = len(candidate.boosts) - 1
                run.snapshot.adapters[adapter_name(g, t)] = adapter
                save_peft_adapter(adapter, config.adapter, config.model.name, adapter_dir(run.dir, g, t))
                losses[g] = after[g]
                info["group_train_loss"][str(g)] = after[g]
            else:
                info["boost_stopped"] = True
                console.log(
                    f"boosting stops: group {g}'s training loss did not drop ({losses[g]:.4f} -> {after[g]:.4f})"
                )
            records.append(record)
            run.save()

    def _trained(self, step: int, g: int, members: list[str], group: GroupAdapters) -> Steps[AdapterState]:
        """A new adapter trained from theta* on the residual objective for ``boost.rounds`` rounds."""
        run = self.run

        def log_round(rnd: int, new: dict[int, AdapterState], metrics: dict[str, Any]) -> Steps[bool]:
            run.log({"phase": "boost-train", "step": step, **metrics})
            yield from ()
            return False

        trained = yield from GroupTraining(self.fed, f"boost {step}", objective="boost").rounds(
            {g: members},
            {g: self.fed.theta_star},
            {g: make_aggregation(run.config)},
            1,
            run.config.boost.rounds,
            log_round,
            {g: group},
        )
        return trained[g]
