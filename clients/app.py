"""The ClientApp: one Flower client per task (a Shakespeare role or a classification task).

A node's ``partition-id`` selects the client at that index of the run's clients, sorted by
id. Heavy state (tokenizer, prepared samples, the base model with its adapter) lives in a
per-process cache, because Flower recreates the ClientApp for every message: the base
model is loaded once per worker process, and the adapter is reset to theta* (or set to the
received weights) per message instead of being rebuilt.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from transformers import PreTrainedTokenizerBase

from clients.protocol import sketch_to_record
from elora_fed.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.classification import ClassificationSamples
from elora_fed.client_sketch import sketch_client, sketch_setup
from elora_fed.config import AdapterConfig, DataConfig, ModelConfig, RunConfig
from elora_fed.errors import DataError
from elora_fed.federated_data import load_clients
from elora_fed.lm_samples import ClientSamples
from elora_fed.models import load_base_model, load_tokenizer

app = ClientApp()


@lru_cache(maxsize=1)
def _tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(model)


@lru_cache(maxsize=2)
def _clients(model: ModelConfig, data: DataConfig) -> list[ClientSamples] | list[ClassificationSamples]:
    return load_clients(data, _tokenizer(model))


@lru_cache(maxsize=1)
def _adapted_model(model: ModelConfig, adapter: AdapterConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The base model with its seeded adapter, loaded once per process, and theta*."""
    peft_model = attach_lora(load_base_model(model), adapter)
    return peft_model, adapter_state(peft_model)


def client_for(context: Context) -> ClientSamples | ClassificationSamples:
    """This node's client: the one at index ``partition-id`` of the sorted client list."""
    config = RunConfig.from_flat(context.run_config)
    clients = _clients(config.model, config.data)
    partition = int(context.node_config["partition-id"])
    if not 0 <= partition < len(clients):
        raise DataError(f"partition-id {partition} is out of range: this run has {len(clients)} clients")
    return clients[partition]


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Reply with this client's id and its number of samples per split."""
    client = client_for(context)
    content = RecordDict(
        {
            "client": ConfigRecord({"client_id": client.client_id}),
            "samples": MetricRecord({split: _count(client, split) for split in client.splits}),
        }
    )
    return Message(content, reply_to=msg)


@app.query("sketch")
def sketch(msg: Message, context: Context) -> Message:
    """Reply with this client's sketch (``sketch_content``)."""
    return Message(sketch_content(context), reply_to=msg)


def sketch_content(context: Context) -> RecordDict:
    """This client's sketch: b and projected gradients of its train and validation samples.

    The model, adapter seed and projection seed come from the run config, which the server
    and every client share; only the seeds define theta* and P.
    """
    config = RunConfig.from_flat(context.run_config)
    client = client_for(context)
    model, theta_star = _adapted_model(config.model, config.adapter)
    load_adapter_state(model, theta_star)
    projector, metadata = sketch_setup(model, config)
    sk = config.sketch
    pad = _tokenizer(config.model).pad_token_id
    result = sketch_client(model, client, projector, metadata, sk.batch_size, sk.buffer_mb, pad_token_id=pad)
    return sketch_to_record(result)


def _count(client: ClientSamples | ClassificationSamples, split: str) -> int:
    if isinstance(client, ClientSamples):
        return len(client.splits[split])
    return len(client.splits[split].labels)
