"""The server's phases, each a small class over the message protocol (``clients.protocol``).

Replaceable by dotted path in the config (``strategies.*``, ``train.aggregation``):
- an affinity estimator: ``Class(config)`` with ``estimate(collected) -> (n, n) array``,
  higher meaning "training together helps", where ``collected`` is the clients' sketches
  in client order (their statistics in private mode); ``SurrogateAffinity`` is the default;
- a clustering: ``Class(config)`` with ``group(affinity, client_ids) -> labels`` (n ints,
  groups numbered from 0; ``SDPClustering`` is the default);
- the aggregation: any Flower ``Strategy`` class (FedAvg, FedProx, FedAdam, ...), run by
  ``GroupTraining`` once per group on a view of the grid that holds only the group's nodes.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import random
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from clients.protocol import number, run_record
from clients.records import ensemble_records, sketch_from_record, statistics_from_record
from elora_fed.affinity import (
    affinity_from_features,
    affinity_from_statistics,
    affinity_from_subset_sums,
    gradient_cosine_affinity,
    remove_offsets,
)
from elora_fed.client_sketch import ClientSketch
from elora_fed.clustering import cluster, spectral_clustering
from elora_fed.config import RunConfig
from elora_fed.ensemble import AdapterState, GroupAdapters, lift, ridge_fit, ridge_statistics
from elora_fed.errors import ConfigError, DataError
from elora_fed.projection import JLProjector
from elora_fed.statistics import ClientStatistics
from elora_fed.subset_solver import SubsetSums
from elora_fed.task_features import task_features
from strategies.federation import Federation, GroupGrid
from strategies.messaging import Exchange, console
from strategies.validation import UpdateLimits, screen


def load_class(path: str, key: str) -> type:
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


class SketchPhase:
    """Phase 2: every client's sketch of its train and validation samples (or, private mode, its statistics).

    Clients that fail are left out (``Federation.exchange`` stops the run below
    ``federation.min_fraction``); the pipeline assigns them to a group without a sketch.
    """

    def run(self, fed: Federation) -> tuple[list[ClientSketch] | list[tuple[str, ClientStatistics]], Exchange]:
        result = fed.exchange(fed.requests(fed.client_ids, "query.sketch", {}), "sketch")
        if fed.config.affinity.mode == "secure":  # statistics stay on the clients (``strategies.secure_statistics``)
            return [], result
        if fed.config.affinity.mode == "private":
            stats = [statistics_from_record(r.content, fed.config.sketch.dim) for r in result.replies]
            return sorted(stats, key=lambda item: item[0]), result
        return sorted((sketch_from_record(r.content) for r in result.replies), key=lambda s: s.client_id), result


class SurrogateAffinity:
    """Phase 3a: task affinity from surrogate fine-tuning on client subsets (``affinity.mode``).

    ``estimate`` gets what the sketch phase collected, in client order: ``ClientSketch``es,
    or ``ClientStatistics`` in private mode; in secure mode a ``SubsetSums`` that sums each
    subset by secure aggregation (``strategies.secure_statistics.SecureStatistics``).
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config.affinity

    def estimate(self, collected: Sequence[ClientSketch] | Sequence[ClientStatistics] | SubsetSums) -> np.ndarray:
        affinity = self._estimate(collected)
        n = affinity.shape[0]
        return remove_offsets(affinity) if self.config.offsets == "remove" and n >= 3 else affinity

    def _estimate(self, collected: Sequence[ClientSketch] | Sequence[ClientStatistics] | SubsetSums) -> np.ndarray:
        af = self.config
        if isinstance(collected, SubsetSums):
            size = min(af.subset_size, collected.num_clients)
            return affinity_from_subset_sums(collected, size, af.num_subsets, af.lam, af.seed).affinity
        size = min(af.subset_size, len(collected))
        if all(isinstance(c, ClientStatistics) for c in collected):
            stats = [c for c in collected if isinstance(c, ClientStatistics)]
            return affinity_from_statistics(stats, size, af.num_subsets, af.lam, af.seed).affinity
        tasks = [task_features(c) for c in collected if isinstance(c, ClientSketch)]
        if af.mode == "gradient-cosine":
            return gradient_cosine_affinity(tasks)
        return affinity_from_features(tasks, size, af.num_subsets, af.lam, af.seed).affinity


class SDPClustering:
    """Phase 3b: groups maximizing average within-group affinity (``clustering.*``)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config.clustering
        self.seed = config.seed

    def group(self, affinity: np.ndarray, client_ids: Sequence[str]) -> np.ndarray:
        cl = self.config
        if len(client_ids) < 2:
            return np.zeros(len(client_ids), dtype=int)
        if cl.method == "spectral":
            return spectral_clustering(affinity, cl.num_groups, seed=self.seed)
        m = min(cl.num_groups, len(client_ids)) or None
        return cluster(affinity, m, method=cl.method, solver=cl.solver, seed=self.seed).labels


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


RoundCallback = Callable[[int, dict[int, AdapterState], dict[str, Any]], bool | None]
"""(round, adapters, metrics) after every round; returning True stops training there."""


@dataclass
class GroupTraining:
    """Phase 4 (and trained boosting): federated rounds for several groups at once.

    In each round every group's strategy picks its clients (seeded by run seed, label, group
    and round) and builds its messages; all groups' messages go out in one exchange, and
    each group's replies, sorted by client, go back to its own strategy to aggregate.
    ``on_round`` is called after every round with the new adapters and the round's metrics;
    when it returns True, training stops after that round.
    """

    fed: Federation
    label: str
    objective: str = "fit"

    def run(
        self,
        groups: Mapping[int, Sequence[str]],
        arrays: dict[int, AdapterState],
        strategies: Mapping[int, Strategy],
        first_round: int,
        rounds: int,
        on_round: RoundCallback,
        ensemble: Mapping[int, GroupAdapters] | None = None,
    ) -> dict[int, AdapterState]:
        config = self.fed.config
        tc = config.train
        limits = UpdateLimits.from_config(config.federation)
        for rnd in range(first_round, rounds + 1):
            messages: list[Message] = []
            proximal_mu: dict[str, float] = {}  # what FedProx-style strategies told the clients
            for g, members in groups.items():
                random.seed(zlib.crc32(f"{config.seed}:{self.label}:{g}:{rnd}".encode()))
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
                for message in strategies[g].configure_train(rnd, ArrayRecord(arrays[g]), options, view):
                    sent = message.content.config_records.get("config", ConfigRecord())
                    if "proximal-mu" in sent:
                        proximal_mu[str(g)] = number(sent, "proximal-mu")
                    message.content["run"] = run_record(config)
                    if ensemble is not None:
                        for name, record in ensemble_records({g: ensemble[g]}).items():
                            message.content[name] = record
                    messages.append(message)
            result = self.fed.exchange(messages, f"{self.label} round {rnd}/{rounds}")
            group_of = {self.fed.node_of[c]: g for g, members in groups.items() for c in members}
            losses: dict[str, float] = {}
            rejected: Counter[str] = Counter()
            for g in groups:
                replies = [r for r in result.replies if group_of.get(r.metadata.src_node_id) == g]
                replies, rejected_g = screen(replies, arrays[g], limits)
                rejected.update(rejected_g)
                aggregated, metrics = strategies[g].aggregate_train(rnd, replies)
                if aggregated is not None:
                    arrays[g] = aggregated.to_torch_state_dict()
                if metrics is not None and "train-loss" in metrics:
                    losses[str(g)] = float(metrics["train-loss"])  # type: ignore[arg-type]
            if rejected:
                console.log(f"{self.label} round {rnd}: rejected updates {dict(rejected)}")
            round_metrics: dict[str, Any] = {"round": rnd, "train_loss": losses, "rejected": dict(rejected)}
            round_metrics["aggregation"] = {str(g): type(strategies[g]).__name__ for g in groups}
            if proximal_mu:
                round_metrics["proximal_mu"] = proximal_mu
            if on_round(rnd, arrays, {**round_metrics, **exchange_metrics(result)}):
                break
        return arrays


class EnsembleEvaluation:
    """Loss and accuracy of ensembles on the clients' data (``evaluate`` messages).

    Evaluation is idempotent, so failed requests are re-sent ``federation.retries`` times;
    clients that still fail are missing from the result.
    """

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def run(
        self,
        label: str,
        split: str,
        groups_of: Mapping[str, Mapping[int, GroupAdapters]],
        weights: Mapping[str, Sequence[float]] | None = None,
        with_base: bool = False,
        finetune_steps: int = 0,
    ) -> tuple[dict[str, dict[str, Any]], Exchange]:
        """Per client: ``loss``, ``num-examples``, ``weights`` and (given ``weights``) ``accuracy`` on ``split``.

        ``groups_of[client]`` are the groups the client combines; without ``weights`` each
        client learns its own on this split. Also per client: ``group_loss`` and
        ``group_accuracy`` (each group's output alone) and, ``with_base``, ``base_loss`` and
        ``base_accuracy`` (theta*). ``finetune_steps > 0`` (MTL-FT, one group): each client
        first fine-tunes the group adapter locally for that many steps.
        """
        messages = []
        for client, groups in groups_of.items():
            options: dict[str, Any] = {
                "split": split,
                "groups": [str(g) for g in groups],
                "with-base": with_base,
                "finetune-steps": finetune_steps,
            }
            if weights is None:
                options["fit-weights"] = True
            else:
                options["weights"] = [float(w) for w in weights[client]]
            records: dict[str, ArrayRecord | ConfigRecord] = {"config": ConfigRecord(options)}
            records.update(ensemble_records(groups))
            messages.extend(self.fed.requests([client], "evaluate", records))
        result = self.fed.exchange(messages, label, retries=self.fed.config.federation.retries)
        per_client = {}
        for reply in result.replies:
            metrics = reply.content.metric_records["metrics"]
            weights_reply = metrics.get("weights")
            if not isinstance(weights_reply, list) or len(weights_reply) != len(groups_of[self.fed.client_of(reply)]):
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
            if with_base:
                row["base_loss"] = number(metrics, "base-loss")
                row["base_accuracy"] = number(metrics, "base-accuracy")
            per_client[self.fed.client_of(reply)] = row
        return per_client, result


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
) -> tuple[dict[str, BoostReply], Exchange]:
    """Ask each client for ``BoostReply`` under the group ensemble given for it (retried like evaluation)."""
    messages = []
    for client, group in sorted(ensembles.items()):
        records: dict[str, ArrayRecord | ConfigRecord] = {
            "options": ConfigRecord({"ridge-statistics": ridge_statistics})
        }
        records.update(ensemble_records({0: group}))
        messages.extend(fed.requests([client], "query.boost", records))
    result = fed.exchange(messages, label, retries=fed.config.federation.retries)
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


def first_order_boost(
    fed: Federation,
    members: Sequence[str],
    group: GroupAdapters,
    sketches: Mapping[str, ClientSketch],
    known: Mapping[str, BoostReply] | None = None,
) -> tuple[AdapterState, Exchange | None]:
    """A boosting adapter fit in sketch space: ridge regression of the residuals, lifted with P.

    With the sketch phase's train features at hand (exact mode: same theta* and P), only
    residuals are needed: those ``known`` from the group's last loss check (``query_boost``
    under the same ensemble) are used as they are, so no exchange runs (the Exchange is
    then None); otherwise clients are asked for them. In private mode clients send the
    additive statistics G^T G and G^T r instead, and no per-sample feature leaves them.
    """
    config = fed.config
    have = all(c in sketches for c in members)
    result: Exchange | None = None
    replies = dict(known or {})
    if not have or any(c not in replies for c in members):
        replies, result = query_boost(fed, {c: group for c in members}, "boost", ridge_statistics=not have)
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


def exchange_metrics(result: Exchange) -> dict[str, Any]:
    """Timing of one exchange: wall time against the clients' own compute time, and the part of it spent loading."""
    return {
        "exchange": result.label,
        "clients": len(result.replies),
        "failed": len(result.failures),
        "wall_s": round(result.seconds, 3),
        "client_compute_s": round(result.compute_s, 3),
        "client_load_s": round(result.total("load-s"), 3),
    }
