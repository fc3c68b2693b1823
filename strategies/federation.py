"""The server's view of the federation: which node holds which client, and how to address them.

Nodes register asynchronously, so the server first waits for the expected number; then one
``query.stats`` round maps every node to its client id (the server knows nothing about
partitions except by asking) and fetches theta* from one node, so the server needs neither
the data nor the model. Every request carries the run config (``clients.protocol``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from clients.protocol import MODEL_SIZE_KEYS, number, run_record
from elora_fed.accounting import ModelSize
from elora_fed.config import RunConfig
from elora_fed.ensemble.outputs import AdapterState
from elora_fed.errors import DataError
from strategies.ledger import Ledger
from strategies.messaging import Exchange, console, exchange


@dataclass
class Federation:
    """The grid, the run config, the client id <-> node id map, and the ledger that exchanges are booked in.

    ``phase`` names the pipeline phase that exchanges are currently booked under.
    """

    grid: Grid
    config: RunConfig
    node_of: dict[str, int]
    samples: dict[str, dict[str, int]]
    theta_star: AdapterState
    model_size: ModelSize
    ledger: Ledger
    phase: str = "nodes"

    def exchange(self, messages: Iterable[Message], label: str, retries: int = 0) -> Exchange:
        """Send and collect (``strategies.messaging.exchange``), booking the cost under the current phase.

        Requests that fail or time out are re-sent up to ``retries`` times (only for
        idempotent requests: evaluation, queries). Every attempt is stamped with the
        ``exchange`` record (label, attempt), which clients use to decide simulated dropout.
        DataError if fewer than ``federation.min_fraction`` of the clients answered in the end.
        Replies come back sorted by client id, whatever order they arrived in: aggregation
        sums them in that order, so the same replies always give the same float32 result.
        """
        messages = list(messages)
        result = self._attempt(messages, label, 0)
        for attempt in range(1, retries + 1):
            if not result.failed_nodes:
                break
            failed = set(result.failed_nodes)
            again = [
                Message(
                    RecordDict(dict(m.content.items())),
                    dst_node_id=m.metadata.dst_node_id,
                    message_type=m.metadata.message_type,
                )
                for m in messages
                if m.metadata.dst_node_id in failed
            ]
            result = result.merge(self._attempt(again, label, attempt))
        needed = math.ceil(self.config.federation.min_fraction * result.sent)
        if len(result.replies) < needed:
            raise DataError(
                f"{label}: only {len(result.replies)} of {result.sent} clients answered, fewer than "
                f"federation.min_fraction = {self.config.federation.min_fraction}; first failures: {result.failures[:2]}"
            )
        return dataclasses.replace(result, replies=sorted(result.replies, key=self.client_of))

    def _attempt(self, messages: list[Message], label: str, attempt: int) -> Exchange:
        for message in messages:
            message.content["exchange"] = ConfigRecord({"label": label, "attempt": attempt})
        title = label if attempt == 0 else f"{label} (retry {attempt})"
        result = exchange(self.grid, messages, title, self.config.federation)
        self.ledger.record(self.phase, result, self._client_by_node)
        return result

    @property
    def client_ids(self) -> list[str]:
        return sorted(self.node_of)

    def requests(
        self,
        client_ids: Iterable[str],
        message_type: str,
        records: Mapping[str, ArrayRecord | MetricRecord | ConfigRecord],
    ) -> list[Message]:
        """One message per client, all carrying ``records`` and the run config."""
        content = RecordDict({"run": run_record(self.config), **records})
        return [Message(content, dst_node_id=self.node_of[c], message_type=message_type) for c in client_ids]

    def client_of(self, reply: Message) -> str:
        return self._client_by_node[reply.metadata.src_node_id]

    @functools.cached_property
    def _client_by_node(self) -> dict[int, str]:  # node_of is fixed once the federation is discovered
        return {node: client for client, node in self.node_of.items()}


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """Node ids once ``expected`` nodes have registered; DataError naming the shortfall after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < expected:
        raise DataError(
            f"only {len(nodes)} of {expected} expected nodes registered within {timeout_s:.0f} s "
            "(federation.wait_s); start more SuperNodes or set federation.num_nodes"
        )
    console.log(f"{len(nodes)} nodes registered")
    return nodes


def discover(grid: Grid, config: RunConfig, nodes: list[int], ledger: Ledger) -> Federation:
    """Ask every node which client it holds; theta* and the model's sizes come from the first node."""
    run = ConfigRecord({"config": run_record(config)["config"]})
    messages = []
    for i, node in enumerate(nodes):
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            "run": run,
            "options": ConfigRecord({"with-theta-star": i == 0}),
        }
        messages.append(Message(RecordDict(records), dst_node_id=node, message_type="query.stats"))
    # Bounded by wait_s, not the round timeout: the first message also loads each worker's data.
    result = exchange(
        grid, messages, "clients", dataclasses.replace(config.federation, timeout_s=config.federation.wait_s)
    )
    node_of: dict[str, int] = {}
    samples: dict[str, dict[str, int]] = {}
    theta_star: AdapterState | None = None
    model_size: ModelSize | None = None
    for reply in result.replies:
        client = str(reply.content.config_records["client"]["client_id"])
        if client in node_of:
            raise DataError(f"nodes {node_of[client]} and {reply.metadata.src_node_id} both hold client '{client}'")
        node_of[client] = reply.metadata.src_node_id
        counts = reply.content.metric_records["samples"]
        samples[client] = {k: int(number(counts, k)) for k in counts}
        if "theta-star" in reply.content.array_records:
            theta_star = reply.content.array_records["theta-star"].to_torch_state_dict()
            sizes = reply.content.metric_records["model-size"]
            base, adapter, gradient = (int(number(sizes, k)) for k in MODEL_SIZE_KEYS)
            model_size = ModelSize(base, adapter, gradient, config.sketch.dim)
    if theta_star is None or model_size is None:
        raise DataError("the node asked for theta* did not answer: " + "; ".join(result.failures[:1]))
    fed = Federation(grid, config, node_of, samples, theta_star, model_size, ledger)
    ledger.record("nodes", result, fed._client_by_node)
    return fed


class GroupGrid(Grid):
    """A view of a grid that shows a strategy only one group's nodes.

    Flower strategies sample from ``grid.get_node_ids()``; handing them this view makes any
    strategy (FedAvg, FedProx, FedAdam, ...) train one group, while all groups' messages
    still go out together through the real grid. Node ids are listed in the group's client
    order, so seeded sampling picks the same clients in every run.
    """

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [n for n in self._grid.get_nodes() if n.node_id in self._node_ids]

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
