"""Evaluation of ensembles on the clients' data, and the two phases built on it: ensemble weights and test.

Evaluation is idempotent, so failed requests are re-sent ``federation.retries`` times;
clients that still fail are missing from the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from clients.protocol import number
from clients.records import ensemble_records
from elora_fed.ensemble.outputs import GroupAdapters
from elora_fed.errors import ConfigError, DataError
from elora_fed.plugins import load_class
from elora_fed.run_dir import write_json
from strategies.federation import Federation
from strategies.messaging import Exchange, exchange_metrics
from strategies.phase import Request, Steps
from strategies.run_state import RunState


def evaluate(
    fed: Federation,
    label: str,
    split: str,
    groups_of: Mapping[str, Mapping[int, GroupAdapters]],
    weights: Mapping[str, Sequence[float]] | None = None,
    with_base: bool = False,
    finetune_steps: int = 0,
    finetune_curve: bool = False,
) -> Steps[tuple[dict[str, dict[str, Any]], Exchange]]:
    """Per client: ``loss``, ``num-examples``, ``weights`` and (given ``weights``) ``accuracy`` on ``split``.

    ``groups_of[client]`` are the groups the client combines; without ``weights`` each
    client learns its own on this split. Also per client: ``group_loss`` and
    ``group_accuracy`` (each group's output alone) and, ``with_base``, ``base_loss`` and
    ``base_accuracy`` (theta*). ``finetune_steps > 0`` (MTL-FT, one group): each client
    first fine-tunes the group adapter locally for that many steps; with ``finetune_curve``
    it also reports ``finetune_curve``, its loss on ``split`` after 0, 1, ..., that many steps.
    """
    messages = []
    for client, groups in groups_of.items():
        options: dict[str, Any] = {
            "split": split,
            "groups": [str(g) for g in groups],
            "with-base": with_base,
            "finetune-steps": finetune_steps,
            "finetune-curve": finetune_curve,
        }
        if weights is None:
            options["fit-weights"] = True
        else:
            options["weights"] = [float(w) for w in weights[client]]
        records: dict[str, ArrayRecord | ConfigRecord] = {"config": ConfigRecord(options)}
        records.update(ensemble_records(groups))
        messages.extend(fed.requests([client], "evaluate", records))
    result = yield Request(messages, label, retries=fed.config.federation.retries)
    per_client = {}
    for reply in result.replies:
        metrics = reply.content.metric_records["metrics"]
        weights_reply = metrics.get("weights")
        if not isinstance(weights_reply, list) or len(weights_reply) != len(groups_of[fed.client_of(reply)]):
            raise DataError(f"malformed evaluate reply: weights {weights_reply!r}")
        row: dict[str, Any] = {
            "loss": number(metrics, "loss"),
            "num-examples": int(number(metrics, "num-examples")),
            "weights": [float(w) for w in weights_reply],
            "group_loss": [float(v) for v in metrics.get("group-loss", [])],  # type: ignore[union-attr]
            "group_accuracy": [float(v) for v in metrics.get("group-accuracy", [])],  # type: ignore[union-attr]
        }
        if "accuracy" in metrics:  # top-1 of the combination: sent for given weights only
            row["accuracy"] = number(metrics, "accuracy")
        if finetune_curve:
            curve = metrics.get("finetune-curve")
            if not isinstance(curve, list) or len(curve) != finetune_steps + 1:
                raise DataError(f"malformed evaluate reply: finetune-curve {curve!r}")
            row["finetune_curve"] = [float(v) for v in curve]
        if with_base:
            row["base_loss"] = number(metrics, "base-loss")
            row["base_accuracy"] = number(metrics, "base-accuracy")
        per_client[fed.client_of(reply)] = row
    return per_client, result


def client_mean(per_client: Mapping[str, Mapping[str, Any]], key: str) -> float:
    """The unweighted mean over clients (every client counts once, as in the paper)."""
    values = [float(v[key]) for v in per_client.values()]
    return float(np.mean(values)) if values else float("nan")


class WeightsPhase:
    """Each client's weights over the groups' outputs, learned on its validation split.

    Writes ``ensemble_weights.json``. One group: weight 1. A clustering with
    ``own_group_only`` (local training): each client's own adapter. A client whose
    evaluation failed puts all weight on its own group.

    MTL-FT (``train.finetune_steps = K > 0``, one group) learns its one choice here as
    well: how many local steps, 0 to K, each client fine-tunes before the test. Every
    client fine-tunes K steps and reports its validation loss after each; the count of
    lowest mean validation loss is used (``finetune_steps.json``), so test data plays no
    part and 0 (the shared adapter as it is) stays possible.
    """

    def __init__(self, run: RunState, fed: Federation) -> None:
        self.run, self.fed = run, fed

    def steps(self) -> Steps[None]:
        run, fed = self.run, self.fed
        groups, ensemble = run.groups(), run.ensemble()
        own = {c: g for g, members in groups.items() for c in members}
        fallback = {c: [float(g == own[c]) for g in ensemble] for c in fed.client_ids}
        clustering = load_class(run.config.strategies.clustering, "strategies.clustering")
        if len(ensemble) == 1:  # one group: nothing to weigh
            run.info["weights"] = {c: [1.0] for c in fed.client_ids}
            if run.config.train.finetune_steps:
                run.info["finetune_steps"] = yield from self.finetune_steps(ensemble)
        elif getattr(clustering, "own_group_only", False):
            run.info["weights"] = fallback  # each client's own adapter (local training): nothing to learn
        else:
            per_client, result = yield from evaluate(
                fed, "ensemble weights", "validation", {c: ensemble for c in fed.client_ids}
            )
            run.info["weights"] = {c: per_client[c]["weights"] if c in per_client else fallback[c] for c in fallback}
            run.log(
                {"phase": "weights", "validation_loss": client_mean(per_client, "loss"), **exchange_metrics(result)}
            )
        write_json(run.dir / "ensemble_weights.json", {"groups": sorted(groups), "weights": run.info["weights"]})

    def finetune_steps(self, ensemble: Mapping[int, GroupAdapters]) -> Steps[int]:
        """MTL-FT's local step count, 0 to ``train.finetune_steps``: the lowest mean validation loss."""
        run, fed = self.run, self.fed
        most = run.config.train.finetune_steps
        per_client, result = yield from evaluate(
            fed,
            "MTL-FT local steps",
            "validation",
            {c: ensemble for c in fed.client_ids},
            {c: [1.0] for c in fed.client_ids},
            finetune_steps=most,
            finetune_curve=True,
        )
        if not per_client:
            raise DataError("no client returned a fine-tuning curve: MTL-FT's local steps cannot be chosen")
        curve = np.mean([r["finetune_curve"] for r in per_client.values()], axis=0)
        chosen = int(np.argmin(curve))
        run.log(
            {
                "phase": "weights",
                "finetune_steps": chosen,
                "validation_loss": float(curve[chosen]),  # MTL-FT's combined prediction, as the weights fit logs it
                "finetune_validation_curve": curve.tolist(),
                **exchange_metrics(result),
            }
        )
        write_json(
            run.dir / "finetune_steps.json",
            {
                "chosen": chosen,
                "most": most,
                "mean_validation_loss_by_steps": curve.tolist(),
                "clients": len(per_client),
            },
        )
        return chosen


class FinalTestPhase:
    """Test loss and accuracy per client: the ensemble, the client's own group, and theta* (no training).

    One ``evaluate`` exchange: each client computes every group it weighs once and reports
    the weighted combination, each group alone, and theta*. The rows go to ``info["test"]``,
    from which ``strategies.report`` builds the report.
    """

    def __init__(self, run: RunState, fed: Federation) -> None:
        self.run, self.fed = run, fed

    def steps(self) -> Steps[None]:
        run = self.run
        groups, ensemble = run.groups(), run.ensemble()
        weights = run.info["weights"]
        clients = sorted(weights)
        if run.config.train.finetune_steps and len(ensemble) > 1:
            raise ConfigError(
                "train.finetune_steps (MTL-FT) needs a single group: "
                "strategies.clustering = 'strategies.baselines:OneGroup'"
            )
        # MTL-FT: the count chosen on validation (a checkpoint from before that choice: the configured one)
        finetune = int(run.info.get("finetune_steps", run.config.train.finetune_steps))
        group_of = {c: g for g, members in groups.items() for c in members}
        # Each client evaluates the groups it weighs and its own: a group of weight exactly 0
        # changes nothing in its prediction, and evaluating it would cost a pass per group.
        sent = {
            c: [g for g, w in zip(ensemble, weights[c], strict=True) if w != 0 or g == group_of[c]] for c in clients
        }
        test, result = yield from evaluate(
            self.fed,
            "test",
            "test",
            {c: {g: ensemble[g] for g in sent[c]} for c in clients},
            {c: [w for g, w in zip(ensemble, weights[c], strict=True) if g in sent[c]] for c in clients},
            with_base=True,
            finetune_steps=finetune,
        )
        run.log({"phase": "test", "test_loss": client_mean(test, "loss"), **exchange_metrics(result)})
        run.info["test"] = {
            c: {
                "group": group_of[c],
                "test_loss": r["loss"],
                "test_accuracy": r["accuracy"],
                "test_targets": r["num-examples"],
                "own_group_test_loss": r["group_loss"][sent[c].index(group_of[c])],
                "own_group_test_accuracy": r["group_accuracy"][sent[c].index(group_of[c])],
                "base_test_loss": r["base_loss"],
                "base_test_accuracy": r["base_accuracy"],
            }
            for c, r in test.items()
        }
