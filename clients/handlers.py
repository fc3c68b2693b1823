"""The client's work: one handler per message kind, each ``(content, context) -> reply content``.

``clients.app`` is the Flower glue that routes each message here, in its own process or
in a model holder (``clients.model_holder``). A node's ``partition-id`` selects the client
at that index of the run's clients, sorted by id. Every request carries the run config
(``clients.protocol``). Heavy state (tokenizer, prepared samples, the base model with its
adapter) lives in a per-process cache: the base model is loaded once per process (a Ray
actor in simulation, a model holder in deployment), and each handler sets the adapter
weights it needs (theta*, the received adapter, a group's ensemble members) instead of
rebuilding anything.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import transformers
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from clients.node import Node, Samples, adapted_model, cached_tokenizer, client_for, measured, node_for
from clients.protocol import MODEL_SIZE_KEYS, Metrics, number, run_config
from clients.records import adapter_from, adapter_record, ensemble_from, release_to_record
from clients.secure import (
    StatisticsCache,
    secure_statistics_content,
    surrogate_losses_content,
)
from elora_fed.accounting import base_parameter_count
from elora_fed.data.lm_samples import LMSamples
from elora_fed.ensemble.boosting import residual_targets, ridge_statistics
from elora_fed.ensemble.outputs import GroupAdapters, adapter_outputs, combine, evaluate_ensemble, group_outputs
from elora_fed.ensemble.weights import fit_weights
from elora_fed.errors import DataError
from elora_fed.model.adapters import adapter_state, load_adapter_state
from elora_fed.model.batches import Batch
from elora_fed.model.training import Objective, boost_objective, target_log_loss, train_adapter
from elora_fed.seeds import derive_seed
from elora_fed.sketch.client_sketch import ClientSketch, sketch_client, sketch_setup
from elora_fed.sketch.gradients import gradient_dim, sketch_batches
from elora_fed.surrogate.affinity_modes import affinity_mode
from elora_fed.surrogate.statistics import ClientStatistics

transformers.utils.logging.disable_progress_bar()  # one bar per worker process and message is noise
transformers.utils.logging.set_verbosity_error()


@measured
def stats_content(content: RecordDict, context: Context) -> RecordDict:
    config = run_config(content)
    client = client_for(config, context)
    reply = RecordDict(
        {
            "client": ConfigRecord({"client_id": client.client_id}),
            "samples": MetricRecord({split: _count(client, split) for split in client.splits}),
        }
    )
    options = content.config_records.get("options")
    if options is not None and bool(options.get("with-theta-star", False)):
        model, theta_star = adapted_model(config.model, config.adapter)
        reply["theta-star"] = ArrayRecord(theta_star)
        sizes = (base_parameter_count(model), sum(t.numel() for t in theta_star.values()), gradient_dim(model))
        reply["model-size"] = MetricRecord(dict(zip(MODEL_SIZE_KEYS, sizes, strict=True)))
    return reply


@measured
def sketch_content(content: RecordDict, context: Context) -> RecordDict:
    """This client's sketch: b and projected gradients of its train and validation samples.

    In private mode (``affinity.mode = "private"``) only its additive statistics leave the
    client instead (``elora_fed.surrogate.statistics.ClientStatistics``), never per-sample features.
    The model, adapter seed and projection seed come from the run config, which the server
    and every client share; only the seeds define theta* and P. With ``privacy`` on, both
    are clipped and noised here, before anything is sent (``elora_fed.privacy.mechanism``).
    """
    node = node_for(content, context)
    mode = affinity_mode(node.config)
    if mode.secure_aggregation:  # the release stays here, for the SecAgg+ rounds (``clients.secure``)
        client_id, _, rows = _statistics(content, context)
        return RecordDict(
            {"sketch_meta": ConfigRecord({"client_id": client_id}), "metrics": MetricRecord({"projected-rows": rows})}
        )
    result = _sketch(node)
    reply = release_to_record(result.client_id, mode.release(result))
    reply["metrics"] = MetricRecord({"projected-rows": len(result.outputs)})
    return reply


def _sketch(node: Node) -> ClientSketch:
    load_adapter_state(node.model, node.theta_star)
    projector, metadata = sketch_setup(node.model, node.config)
    sk = node.config.sketch
    pad = cached_tokenizer(node.config.model).pad_token_id
    with node.compute():
        return sketch_client(
            node.model, node.client, projector, metadata, sk.batch_size, sk.buffer_mb, pad_token_id=pad
        )


_STATISTICS = StatisticsCache()


def _statistics(content: RecordDict, context: Context) -> tuple[str, ClientStatistics, int]:
    """Secure mode: this client's released statistics, computed once per run (``clients.secure``)."""
    node = node_for(content, context)

    def compute() -> tuple[ClientStatistics, int]:
        result = _sketch(node)
        release = affinity_mode(node.config).release(result)
        if not isinstance(release, ClientStatistics):
            raise DataError(f"affinity.mode = {node.config.affinity.mode!r} aggregates securely but releases a sketch")
        return release, len(result.outputs)

    stats, rows = _STATISTICS.get(node.config, node.client.client_id, context, compute)
    return node.client.client_id, stats, rows


@measured
def secagg_content(content: RecordDict, context: Context) -> RecordDict:
    return secure_statistics_content(content, context, _statistics)


@measured
def surrogate_content(content: RecordDict, context: Context) -> RecordDict:
    return surrogate_losses_content(content, context, _statistics)


@measured
def train_content(content: RecordDict, context: Context) -> RecordDict:
    """``local-steps`` Adam steps on this client's train split.

    Objective ``fit``: the log loss of every target (group adapters). ``boost``: least
    squares of the new adapter's change of h from theta* against the residuals of the
    group's current ensemble (carried in the request).
    """
    node = node_for(content, context)
    with node.compute():
        options = content.config_records["config"]
        batches = node.batches("train", int(number(options, "batch-size")))
        objective: Objective = target_log_loss
        if str(options.get("objective", "fit")) == "boost":
            (group,) = ensemble_from(content, node.theta_star).values()
            objective = boost_objective(*_boost_targets(node, batches, group))
        load_adapter_state(node.model, adapter_from(content.array_records["arrays"], node.theta_star, "train 'arrays'"))
        seed = derive_seed(options.get("seed", ""), node.client.client_id)
        losses = train_adapter(
            node.model,
            batches,
            steps=int(number(options, "local-steps")),
            lr=number(options, "lr"),
            seed=seed,
            objective=objective,
            proximal_mu=number(options, "proximal-mu", 0.0),
        )
        metrics: Metrics = {
            "num-examples": sum(len(b) for b in batches),
            "train-loss": float(np.mean(losses)),
        }
        return RecordDict({"arrays": adapter_record(adapter_state(node.model)), "metrics": MetricRecord(metrics)})


def _boost_targets(
    node: Node, batches: list[Batch], group: GroupAdapters
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per batch: residuals r = 1 - p under the group's ensemble, and h at theta*."""
    targets, base = [], []
    for batch in batches:
        h = group_outputs(node.model, [batch], group, node.theta_star, node.config.boost.eta).per_sample()
        targets.append(residual_targets(h))
        base.append(adapter_outputs(node.model, [batch], node.theta_star).per_sample())
    return targets, base


@measured
def evaluate_content(content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the groups in the request on ``split``, combined with ``weights``.

    With ``fit-weights`` the weights are learned here first, on this same split (the server
    sends the validation split for that), and returned. The reply also holds each group's
    own loss and accuracy, and with ``with-base`` those of theta* (no training). Accuracy is
    top-1 (``elora_fed.ensemble.outputs``); the combination's is sent only for given weights.
    """
    node = node_for(content, context)
    with node.compute():
        options = content.config_records["config"]
        groups = ensemble_from(content, node.theta_star)
        if not groups:
            raise DataError("evaluate request without adapters")
        batches = node.batches(str(options["split"]))
        finetune = int(number(options, "finetune-steps", 0))
        curve: list[float] = []  # with finetune-curve: the loss on this split after 0, 1, ..., finetune steps
        if finetune > 0:
            on = batches if options.get("finetune-curve", False) else None
            groups = {g: _finetuned(node, group, finetune, on, curve) for g, group in groups.items()}
        fit = bool(options.get("fit-weights", False))
        given = None if fit else np.asarray(options["weights"], dtype=np.float64)
        result = evaluate_ensemble(
            node.model,
            batches,
            list(groups.values()),
            node.theta_star,
            node.config.boost.eta,
            given,
            with_base=bool(options.get("with-base", False)),
        )
        outputs = result.groups
        metrics: Metrics = {
            "group-loss": [o.loss() for o in outputs],
            "group-accuracy": [o.accuracy() for o in outputs],
        }
        if fit:  # weights learned on this split; their combination has no top-1 record (nor needs one)
            ens = node.config.ensemble
            weights = fit_weights(outputs, ens.weight_steps, ens.weight_lr)
            combined = combine(outputs, weights)
        else:
            assert given is not None and result.combined is not None
            weights, combined = given, result.combined
            metrics["accuracy"] = combined.accuracy()
        metrics.update({"loss": combined.loss(), "num-examples": combined.num_targets})
        metrics["weights"] = [float(w) for w in weights]
        if curve:
            metrics["finetune-curve"] = curve
        if result.base is not None:
            metrics.update({"base-loss": result.base.loss(), "base-accuracy": result.base.accuracy()})
        return RecordDict({"metrics": MetricRecord(metrics)})


def _finetuned(
    node: Node, group: GroupAdapters, steps: int, curve_on: list[Batch] | None = None, curve: list[float] | None = None
) -> GroupAdapters:
    """MTL-FT: the group adapter after ``steps`` local steps on this client's train split.

    With ``curve_on``, appends to ``curve`` the adapter's loss on those batches after 0, 1,
    ..., ``steps`` steps: the first t steps of the seeded run are exactly a t-step run, so
    one run gives the validation curve that MTL-FT's step count is chosen from.
    """
    if group.boosts:
        raise DataError("local fine-tuning (finetune-steps) applies to a plain group adapter, not a boosted one")
    tc = node.config.train
    seed = derive_seed(node.config.seed, "finetune", node.client.client_id)
    eta = node.config.boost.eta

    def measure(_step: int = 0) -> None:
        assert curve_on is not None and curve is not None
        now = GroupAdapters(adapter_state(node.model))
        curve.append(group_outputs(node.model, curve_on, now, node.theta_star, eta).loss())

    load_adapter_state(node.model, group.base)
    if curve_on is not None:
        measure()
    train_adapter(
        node.model,
        node.batches("train", tc.batch_size),
        steps,
        tc.lr,
        seed,
        target_log_loss,
        after_step=measure if curve_on is not None else None,
    )
    return GroupAdapters(adapter_state(node.model))


@measured
def boost_content(content: RecordDict, context: Context) -> RecordDict:
    """r = 1 - p per train sample under the group's current ensemble, its training loss, and (if asked) ridge statistics.

    The server holds the train features from the sketch phase in exact mode (theta* and P
    do not change) and needs only the residuals. In private mode it has no per-sample
    features, so it asks for ``ridge-statistics``: G^T G and G^T r of this client's train
    samples, additive over clients like the affinity statistics.
    """
    node = node_for(content, context)
    with node.compute():
        (group,) = ensemble_from(content, node.theta_star).values()
        batches = node.batches("train")
        outputs = group_outputs(node.model, batches, group, node.theta_star, node.config.boost.eta)
        residuals = residual_targets(outputs.per_sample()).numpy().astype(np.float64)
        arrays = {"sample_index": np.arange(len(residuals), dtype=np.int32), "residuals": residuals}
        options = content.config_records.get("options")
        if options is not None and bool(options.get("ridge-statistics", False)):
            load_adapter_state(node.model, node.theta_star)
            projector, _ = sketch_setup(node.model, node.config)
            features = sketch_batches(node.model, batches, projector, node.config.sketch.buffer_mb).features.numpy()
            arrays["gram"], arrays["moment"] = ridge_statistics(features, residuals)
        metrics: Metrics = {
            "num-examples": len(residuals),
            "loss": outputs.loss(),
            "targets": outputs.num_targets,
            "projected-rows": len(features) if "gram" in arrays else 0,
        }
        records = {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return RecordDict({"boost": ArrayRecord(records), "metrics": MetricRecord(metrics)})


def _count(client: Samples, split: str) -> int:
    if isinstance(client, LMSamples):
        return len(client.splits[split])
    return len(client.splits[split].labels)


HANDLERS: dict[str, Callable[[RecordDict, Context], RecordDict]] = {
    "stats": stats_content,
    "sketch": sketch_content,
    "secagg": secagg_content,
    "surrogate_losses": surrogate_content,
    "train": train_content,
    "evaluate": evaluate_content,
    "boost": boost_content,
}
"""Every message kind's handler, by the name ``clients.app`` routes it under."""
