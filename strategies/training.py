"""Federated training of one adapter per group: the training phase, and the rounds boosting reuses.

The aggregation is any Flower ``Strategy`` class (``train.aggregation``: FedAvg, FedProx,
FedAdam, ...), one instance per group, run on a view of the grid that holds only the
group's nodes (``GroupGrid``); all groups' messages of a round go out in one exchange.
"""

from __future__ import annotations

import inspect
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from clients.protocol import number, run_record
from clients.records import adapter_from, adapter_record, ensemble_records
from elora_fed.config import RunConfig
from elora_fed.ensemble.outputs import AdapterState, GroupAdapters
from elora_fed.errors import ConfigError
from elora_fed.model.adapters import save_peft_adapter
from elora_fed.plugins import load_class
from elora_fed.run_dir import adapter_dir, adapter_name
from elora_fed.seeds import derive_seed
from strategies.evaluation import client_mean, evaluate
from strategies.federation import Federation, GroupGrid
from strategies.messaging import console, exchange_metrics
from strategies.phase import Request, Steps
from strategies.run_state import RunState
from strategies.validation import UpdateLimits, screen


def make_aggregation(config: RunConfig) -> Strategy:
    """A fresh aggregation strategy for one group, from ``train.aggregation``.

    Options the class accepts are set from the config: the sampled fraction, minimums of
    one node (a group may have a single client) and FedProx's ``proximal_mu``.
    """
    cls = load_class(config.train.aggregation, "train.aggregation")
    if not issubclass(cls, Strategy):
        raise ConfigError(f"train.aggregation = {config.train.aggregation!r} is not a Flower Strategy")
    options: dict[str, Any] = {
        "fraction_train": config.train.fraction,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        "proximal_mu": config.train.proximal_mu,
    }
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


RoundCallback = Callable[[int, dict[int, AdapterState], dict[str, Any]], Steps[bool]]
"""(round, adapters, metrics) after every round, as steps (it may evaluate); returning True stops training."""


@dataclass
class GroupTraining:
    """Federated rounds for several groups at once (the training phase, and trained boosting).

    In each round every group's strategy picks its clients (seeded by run seed, label, group
    and round) and builds its messages; all groups' messages go out in one exchange, and
    each group's replies, sorted by client, go back to its own strategy to aggregate.
    ``on_round`` runs after every round with the new adapters and the round's metrics;
    when it returns True, training stops after that round.
    """

    fed: Federation
    label: str
    objective: str = "fit"

    def rounds(
        self,
        groups: Mapping[int, Sequence[str]],
        arrays: dict[int, AdapterState],
        strategies: Mapping[int, Strategy],
        first_round: int,
        rounds: int,
        on_round: RoundCallback,
        ensemble: Mapping[int, GroupAdapters] | None = None,
    ) -> Steps[dict[int, AdapterState]]:
        config = self.fed.config
        tc = config.train
        limits = UpdateLimits.from_config(config.federation)
        for rnd in range(first_round, rounds + 1):
            messages: list[Message] = []
            proximal_mu: dict[str, float] = {}  # what FedProx-style strategies told the clients
            for g, members in groups.items():
                random.seed(derive_seed(config.seed, self.label, g, rnd))
                view = GroupGrid(self.fed.grid, [self.fed.node_of[c] for c in sorted(members)])
                options = ConfigRecord(
                    {
                        "local-steps": tc.local_steps,
                        "lr": tc.lr,
                        "batch-size": tc.batch_size,
                        "seed": f"{config.seed}:{self.label}:{rnd}",
                        "objective": self.objective,
                    }
                )
                for message in strategies[g].configure_train(rnd, adapter_record(arrays[g]), options, view):
                    sent = message.content.config_records.get("config", ConfigRecord())
                    if "proximal-mu" in sent:
                        proximal_mu[str(g)] = number(sent, "proximal-mu")
                    message.content["run"] = run_record(config)
                    if ensemble is not None:
                        for name, record in ensemble_records({g: ensemble[g]}).items():
                            message.content[name] = record
                    messages.append(message)
            result = yield Request(messages, f"{self.label} round {rnd}/{rounds}")
            group_of = {self.fed.node_of[c]: g for g, members in groups.items() for c in members}
            losses: dict[str, float] = {}
            rejected: Counter[str] = Counter()
            for g in groups:
                replies = [r for r in result.replies if group_of.get(r.metadata.src_node_id) == g]
                replies, rejected_g = screen(replies, arrays[g], limits)
                rejected.update(rejected_g)
                aggregated, metrics = strategies[g].aggregate_train(rnd, replies)
                if aggregated is not None:
                    arrays[g] = adapter_from(aggregated, arrays[g], f"group {g}'s aggregated adapter")
                if metrics is not None and "train-loss" in metrics:
                    losses[str(g)] = float(metrics["train-loss"])  # type: ignore[arg-type]
            if rejected:
                console.log(f"{self.label} round {rnd}: rejected updates {dict(rejected)}")
            round_metrics: dict[str, Any] = {"round": rnd, "train_loss": losses, "rejected": dict(rejected)}
            round_metrics["aggregation"] = {str(g): type(strategies[g]).__name__ for g in groups}
            if proximal_mu:
                round_metrics["proximal_mu"] = proximal_mu
            if (yield from on_round(rnd, arrays, {**round_metrics, **exchange_metrics(result)})):
                break
        return arrays


def best_name(group: int) -> str:
    """The checkpoint key of the best adapter so far of ``group`` (``train.keep_best``)."""
    return f"{adapter_name(group)}-best"


def keep_best_adapters(run: RunState, new: dict[int, AdapterState], losses: dict[int, float], rnd: int) -> None:
    """Checkpoint each group's adapter of round ``rnd`` where its validation loss is its lowest so far."""
    best = run.info.setdefault("group_best", {})  # group -> [lowest validation loss so far, its round]
    for g, loss in losses.items():
        if loss < best.get(str(g), [float("inf")])[0]:
            best[str(g)] = [loss, rnd]
            run.snapshot.adapters[best_name(g)] = new[g]


def kept_rounds(run: RunState) -> dict[str, int]:
    """The round of each group's best adapter so far (``keep_best_adapters``)."""
    return {g: r for g, (_, r) in run.info.get("group_best", {}).items()}


class TrainingPhase:
    """``train.rounds`` rounds of every group from theta*, checkpointed after each round.

    Every ``train.validation_every`` rounds the groups' adapters are evaluated on their
    clients' validation splits; with ``train.patience``, training stops once that many
    evaluations in a row brought no lower validation loss; with ``train.keep_best``, each group
    keeps its adapter of its own lowest validation loss. The adapters are saved under
    ``adapters/group-<g>`` as peft adapters.
    """

    def __init__(self, run: RunState, fed: Federation) -> None:
        self.run, self.fed = run, fed

    def steps(self) -> Steps[None]:
        run, fed, config, snap = self.run, self.fed, self.run.config, self.run.snapshot
        groups = run.groups()
        arrays = {g: snap.adapters.get(adapter_name(g), fed.theta_star) for g in groups}
        strategies = snap.objects.get("strategies") or {g: make_aggregation(config) for g in groups}
        every, patience = config.train.validation_every, config.train.patience

        def on_round(rnd: int, new: dict[int, AdapterState], metrics: dict[str, Any]) -> Steps[bool]:
            snap.adapters.update({adapter_name(g): state for g, state in new.items()})
            snap.objects["strategies"] = strategies
            run.info["train_round"] = rnd
            record = {"phase": "train", **metrics}
            if every and (rnd % every == 0 or rnd == config.train.rounds):
                own = {c: {g: GroupAdapters(new[g])} for g, members in groups.items() for c in members}
                per_client, _ = yield from evaluate(
                    fed, f"round {rnd}: validation", "validation", own, {c: [1.0] for c in own}
                )
                loss = client_mean(per_client, "loss")
                record.update(validation_loss=loss, validation_accuracy=client_mean(per_client, "accuracy"))
                by_group = {
                    g: client_mean({c: per_client[c] for c in members if c in per_client}, "loss")
                    for g, members in groups.items()
                }
                record["group_validation_loss"] = {str(g): v for g, v in by_group.items()}
                if config.train.keep_best:
                    keep_best_adapters(run, new, by_group, rnd)
                    record["kept_rounds"] = kept_rounds(run)  # so far; final on the last round
                best = run.info.setdefault("validation_best", [float("inf"), 0])  # [lowest loss, evaluations since]
                best[:] = [loss, 0] if loss < best[0] else [best[0], best[1] + 1]
                console.log(f"round {rnd}: validation loss {loss:.4f} (best {best[0]:.4f})")
                if patience and best[1] >= patience:
                    run.info["train_stopped"] = rnd
                    console.log(f"training stops at round {rnd}: no better validation loss in {patience} evaluations")
            run.log(record)
            run.save()
            return "train_stopped" in run.info

        first = int(run.info.get("train_round", 0)) + 1
        last = int(run.info.get("train_stopped", config.train.rounds))
        arrays = yield from GroupTraining(fed, "train").rounds(groups, arrays, strategies, first, last, on_round)
        if config.train.keep_best:
            arrays = {g: snap.adapters.pop(best_name(g), state) for g, state in arrays.items()}
            console.log(f"each group keeps its adapter of round {kept_rounds(run)}")
        for g, state in arrays.items():
            snap.adapters[adapter_name(g)] = state
            save_peft_adapter(state, config.adapter, config.model.name, adapter_dir(run.dir, g))
        snap.objects.pop("strategies", None)
