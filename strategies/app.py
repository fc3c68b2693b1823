"""The ServerApp: gathers each client's identity and split sizes into the run directory.

The federated EnsembleLoRA phases (sketch, affinity, grouping, FedAvg, boosting) build on
this app; for now it runs the first step every phase needs: waiting for the federation and
learning which client each node holds.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from elora_fed.config import RunConfig
from elora_fed.run_dir import create_run_dir, write_json

app = ServerApp()


def wait_for_nodes(grid: Grid, settle_s: float = 3.0, timeout_s: float = 120.0) -> list[int]:
    """Node ids once registration has settled: nodes register asynchronously.

    Returns when at least one node is there and the count has not changed for
    ``settle_s`` seconds; raises ``TimeoutError`` if no node registers in ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    seen: list[int] = []
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if nodes != seen:
            seen, stable_since = nodes, time.monotonic()
        elif seen and time.monotonic() - stable_since >= settle_s:
            return seen
        time.sleep(0.2)
    if seen:
        return seen
    raise TimeoutError(f"no node registered within {timeout_s:.0f} s")


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_flat(context.run_config)
    run = create_run_dir(config, "federation")
    nodes = wait_for_nodes(grid)
    queries = [Message(RecordDict(), dst_node_id=node, message_type="query.stats") for node in nodes]
    clients: list[dict[str, object]] = []
    failures = 0
    for reply in grid.send_and_receive(queries, timeout=600):
        if reply.has_error():
            failures += 1
            continue
        counts = {split: int(n) for split, n in reply.content.metric_records["samples"].items()}  # type: ignore[arg-type]
        clients.append({"client_id": str(reply.content.config_records["client"]["client_id"]), **counts})
    clients.sort(key=lambda c: str(c["client_id"]))
    write_json(run / "clients.json", clients)
    print(f"elora-fed: {len(clients)} clients answered ({failures} failed); written to {run / 'clients.json'}")
