"""What a node's handlers work with: the process-wide caches and the ``Node`` built from them.

A process loads its tokenizer, its clients and the base model with its seeded adapter
once (``lru_cache``), and books the time spent loading, so that a handler's reply can say
how much of its time went to loading (``measured``): every message in deployment without
a model holder, the first one otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import Context, MetricRecord, RecordDict
from transformers import PreTrainedTokenizerBase

from clients.protocol import Metrics, number, run_config
from elora_fed.accounting import TokenCounter
from elora_fed.config import RunConfig
from elora_fed.data.classification import ClassificationSamples
from elora_fed.data.config import DataConfig
from elora_fed.data.federated_data import load_clients
from elora_fed.data.lm_samples import LMSamples
from elora_fed.ensemble.outputs import (
    AdapterState,
)
from elora_fed.errors import DataError
from elora_fed.model.adapters import adapter_state, attach_lora
from elora_fed.model.batches import Batch, client_batches
from elora_fed.model.compute import compute_context
from elora_fed.model.config import AdapterConfig, ModelConfig

Samples = LMSamples | ClassificationSamples


_LOADING = [0.0]  # seconds this process has spent filling its caches (tokenizer, clients, base model)


@contextlib.contextmanager
def _loading() -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        _LOADING[0] += time.perf_counter() - start


@lru_cache(maxsize=1)
def cached_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    from elora_fed.model.models import load_tokenizer

    with _loading():
        return load_tokenizer(model)


@lru_cache(maxsize=2)
def _clients(model: ModelConfig, data: DataConfig) -> list[LMSamples] | list[ClassificationSamples]:
    tokenizer = cached_tokenizer(model)
    with _loading():
        return load_clients(data, tokenizer)


_COUNTER = TokenCounter()  # counts every forward and backward pass of this process's model


@lru_cache(maxsize=1)
def adapted_model(model: ModelConfig, adapter: AdapterConfig) -> tuple[torch.nn.Module, AdapterState]:
    """The base model with its seeded adapter, loaded once per process, and theta*."""
    from elora_fed.model.models import load_base_model

    with _loading():
        peft_model = attach_lora(load_base_model(model), adapter)
    _COUNTER.attach(peft_model)
    return peft_model, adapter_state(peft_model)


def measured(handler: Callable[[RecordDict, Context], RecordDict]) -> Callable[[RecordDict, Context], RecordDict]:
    """Add to a handler's reply, in its MetricRecord ``metrics``, what the handler cost.

    ``compute-s`` (wall seconds inside the handler) and the ``elora_fed.accounting.Usage``
    entries: token positions forward and backward, projected rows (set by the handler as
    ``projected-rows``), and the process's peak RSS and CUDA memory. ``load-s`` is the part
    of ``compute-s`` spent filling this process's caches (nonzero on a process's first
    message: in deployment without a model holder, on every message), and ``model-loads``
    the number of times this process has loaded the base model.
    """

    @functools.wraps(handler)
    def wrapper(content: RecordDict, context: Context) -> RecordDict:
        start, loading = time.perf_counter(), _LOADING[0]
        with _COUNTER.measure() as usage:
            reply = handler(content, context)
        metrics: Metrics = dict(reply.metric_records.get("metrics", MetricRecord()))
        usage.projected_rows = int(number(MetricRecord(metrics), "projected-rows", 0))
        metrics.update(usage.metrics())
        metrics["compute-s"] = time.perf_counter() - start
        metrics["load-s"] = _LOADING[0] - loading
        metrics["model-loads"] = adapted_model.cache_info().misses
        reply["metrics"] = MetricRecord(metrics)
        return reply

    return wrapper


@dataclass(frozen=True)
class Node:
    """What a handler works with: the run config, this node's client and the shared model.

    Handlers run every model pass inside ``compute()``: the run's compute dtype.
    """

    config: RunConfig
    client: Samples
    model: torch.nn.Module
    theta_star: AdapterState

    def compute(self) -> contextlib.AbstractContextManager[object]:
        return compute_context(self.config.model)

    def batches(self, split: str, batch_size: int | None = None) -> list[Batch]:
        size = batch_size or self.config.sketch.batch_size
        pad = cached_tokenizer(self.config.model).pad_token_id
        return [b for _, b in client_batches(self.client, split, size, pad)]


def client_for(config: RunConfig, context: Context) -> Samples:
    """This node's client: the one at index ``partition-id`` of the sorted client list."""
    clients = _clients(config.model, config.data)
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < len(clients):
        raise DataError(f"partition-id {partition} is out of range: this run has {len(clients)} clients")
    return clients[partition]


def node_for(content: RecordDict, context: Context) -> Node:
    config = run_config(content)
    client = client_for(config, context)
    model, theta_star = adapted_model(config.model, config.adapter)
    return Node(config, client, model, theta_star)
