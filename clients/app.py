"""The ClientApp: one Flower client per task (a Shakespeare role or a classification task).

A node's ``partition-id`` selects the client at that index of the run's clients, sorted by
id. Heavy state (tokenizer, prepared samples) lives in a per-process cache, because Flower
recreates the ClientApp for every message.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from elora_fed.config import DataConfig, ModelConfig, RunConfig
from elora_fed.errors import DataError
from elora_fed.federated_data import load_lm_clients
from elora_fed.lm_samples import ClientSamples, FederatedSamples
from elora_fed.models import load_tokenizer
from elora_fed.splits import SPLITS

app = ClientApp()


@lru_cache(maxsize=2)
def _clients(model: ModelConfig, data: DataConfig) -> FederatedSamples:
    return load_lm_clients(data, load_tokenizer(model))


def client_for(context: Context) -> ClientSamples:
    """This node's client: the one at index ``partition-id`` of the sorted client list."""
    config = RunConfig.from_flat(context.run_config)
    clients = _clients(config.model, config.data).clients
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
            "samples": MetricRecord({split: len(client.splits[split]) for split in SPLITS}),
        }
    )
    return Message(content, reply_to=msg)
