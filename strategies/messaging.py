"""Sending requests to nodes and collecting their replies, with a live progress display.

``exchange`` pushes all messages at once and polls for replies, so the display can show
how many clients have answered and an ETA; replies past ``timeout`` are abandoned (the
round goes on without those stragglers). Replies come back sorted by sender, so anything
aggregated from them is independent of arrival order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from elora_fed.config import FederationConfig

console = Console(stderr=True)
if not console.is_terminal:
    console.width = 120  # logs: one line per event, not wrapped at 80 columns


@dataclass(frozen=True)
class Exchange:
    """The outcome of one exchange: replies without errors, failures, and timings."""

    label: str
    replies: list[Message]
    failures: list[str]
    failed_nodes: list[int]  # nodes whose request failed or timed out
    sent: int
    seconds: float
    bytes_sent: dict[int, int]  # by destination node
    bytes_received: dict[int, int]  # by source node

    def merge(self, retry: Exchange) -> Exchange:
        """This exchange completed by ``retry``, a re-send of its failed requests."""

        def add(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}

        return Exchange(
            self.label,
            self.replies + retry.replies,
            retry.failures,
            retry.failed_nodes,
            self.sent,
            self.seconds + retry.seconds,
            add(self.bytes_sent, retry.bytes_sent),
            add(self.bytes_received, retry.bytes_received),
        )

    @property
    def compute_s(self) -> float:
        """Sum of the clients' own compute time (``compute-s``), where they report it."""
        return self.total("compute-s")

    def values(self, key: str) -> list[float]:
        """A numeric metric of every reply's ``metrics`` record that has it."""
        found = []
        for reply in self.replies:
            record = reply.content.metric_records.get("metrics")
            value = None if record is None else record.get(key)
            if isinstance(value, int | float):
                found.append(float(value))
        return found

    def total(self, key: str) -> float:
        return sum(self.values(key))

    def peak(self, key: str) -> float:
        return max(self.values(key), default=0.0)


def content_bytes(message: Message) -> int:
    """The payload size of a message: the bytes of its records (``records_bytes``)."""
    return records_bytes(message.content)


def records_bytes(content: RecordDict) -> int:
    """The bytes of a message's records.

    Flower 1.42's ``count_bytes`` rejects a record holding an empty string (SecAgg+'s FitRes
    status) or list; such a record's items are counted here instead: the key, 8 per number,
    the length of each bytes or str value.
    """
    total = 0
    for record in content.values():
        try:
            total += record.count_bytes()
        except (ValueError, IndexError):  # an empty string raises ValueError, an empty list IndexError
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                total += len(key) + sum(len(v) if isinstance(v, str | bytes) else 8 for v in values)
    return total


def exchange(grid: Grid, messages: Iterable[Message], label: str, federation: FederationConfig) -> Exchange:
    """Send ``messages``, wait for their replies up to ``federation.timeout_s`` seconds, show progress.

    At most ``federation.max_in_flight`` messages (0: all) wait at the SuperLink at a time; the rest
    are pushed as replies come in, and replies are checked every ``federation.poll_s`` seconds.
    Flower's simulation engine scans every stored message for every node ten times a second,
    so hundreds of queued messages cost a CPU core that the clients need. On a terminal the
    progress is a live bar; otherwise (logs, CI) a line every 30 s.
    """
    start = time.perf_counter()
    last_line = start
    timeout = federation.timeout_s
    queue = list(messages)
    sent = len(queue)
    bytes_sent: dict[int, int] = {}
    for message in queue:
        node = message.metadata.dst_node_id
        bytes_sent[node] = bytes_sent.get(node, 0) + content_bytes(message)
    window = federation.max_in_flight if federation.max_in_flight > 0 else sent
    destination: dict[str, int] = {}

    def push(batch: list[Message]) -> set[str]:
        ids = list(grid.push_messages(batch))
        destination.update(zip(ids, (m.metadata.dst_node_id for m in batch), strict=True))
        return set(ids)

    pending = push(queue[:window])
    queue = queue[window:]
    received: list[Message] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("answered"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=sent)
        while pending and time.perf_counter() - start < timeout:
            replies = list(grid.pull_messages(pending))
            for reply in replies:
                pending.discard(reply.metadata.reply_to_message_id)
            received.extend(replies)
            if queue and len(pending) < window:
                more, queue = queue[: window - len(pending)], queue[window - len(pending) :]
                pending.update(push(more))
            progress.update(task, completed=len(received))
            now = time.perf_counter()
            if not console.is_terminal and now - last_line >= 30 and pending:
                last_line = now
                eta = (now - start) / len(received) * (sent - len(received)) if received else float("nan")
                console.log(f"{label}: {len(received)}/{sent} answered after {now - start:.0f} s, ETA {eta:.0f} s")
            if pending and not replies:
                time.sleep(federation.poll_s)
    ok = sorted((r for r in received if not r.has_error()), key=lambda r: r.metadata.src_node_id)
    failures = [f"node {r.metadata.src_node_id}: {error_gist(r.error.reason or '')}" for r in received if r.has_error()]
    failures += [f"no reply within {timeout:.0f} s"] * (len(pending) + len(queue))
    failed_nodes = [r.metadata.src_node_id for r in received if r.has_error()]
    failed_nodes += [destination[i] for i in pending] + [m.metadata.dst_node_id for m in queue]
    seconds = time.perf_counter() - start
    bytes_received = {r.metadata.src_node_id: content_bytes(r) for r in ok}
    result = Exchange(label, ok, failures, sorted(failed_nodes), sent, seconds, bytes_sent, bytes_received)
    note = f", {len(failures)} failed" if failures else ""
    console.log(f"{label}: {len(ok)}/{sent} answered{note} in {seconds:.1f} s")
    for failure in failures[:3]:
        console.log(f"  {failure}")
    return result


def error_gist(text: str) -> str:
    """The gist of a client's error: its last message line (Ray wraps it in whole tracebacks)."""
    lines = [line.strip(" '\"<>") for line in text.replace("\\n", "\n").splitlines() if line.strip(" '\"<>")]
    return (lines[-1] if lines else "error")[:300]


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
