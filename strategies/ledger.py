"""The run's cost ledger: what every phase cost, summed over its exchanges.

Per phase: token positions forward and backward and projected samples (reported by the
clients, turned into FLOPs by ``elora_fed.accounting.ModelSize``), bytes sent and received
(total and per client), failed requests, the peak memory any client process reached, and
wall time. The ledger lives in the checkpoint's JSON, so a resumed run keeps what the
killed one spent.
"""

from __future__ import annotations

from typing import Any

from elora_fed.accounting import ModelSize, peak_rss_bytes
from strategies.messaging import Exchange

_SUMS = ("forward-tokens", "backward-tokens", "projected-rows")
_PEAKS = ("peak-rss-bytes", "cuda-max-allocated-bytes")


class Ledger:
    """Accumulates exchanges into ``state`` (a JSON-able dict owned by the checkpoint)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        state.setdefault("phases", {})
        state.setdefault("bytes_per_client", {})

    def record(self, phase: str, result: Exchange, client_of_node: dict[int, str]) -> None:
        entry = self.state["phases"].setdefault(
            phase, {**{k: 0.0 for k in _SUMS + _PEAKS}, "bytes_sent": 0, "bytes_received": 0, "messages": 0}
        )
        entry["failed"] = entry.get("failed", 0) + len(result.failures)
        for key in _SUMS:
            entry[key] += result.total(key)
        for key in _PEAKS:
            entry[key] = max(entry[key], result.peak(key))
        entry["messages"] += result.sent
        per_client = self.state["bytes_per_client"]
        for node, size in result.bytes_sent.items():
            entry["bytes_sent"] += size
            per_client.setdefault(client_of_node.get(node, str(node)), {}).setdefault(phase, [0, 0])[0] += size
        for node, size in result.bytes_received.items():
            entry["bytes_received"] += size
            per_client.setdefault(client_of_node.get(node, str(node)), {}).setdefault(phase, [0, 0])[1] += size

    def summary(self, size: ModelSize | None, seconds: dict[str, float]) -> dict[str, Any]:
        """Per phase and in total: FLOPs, bytes, peak memory, wall seconds; plus bytes per client."""
        phases: dict[str, Any] = {}
        for phase, entry in self.state["phases"].items():
            flops = (
                size.flops(entry["forward-tokens"], entry["backward-tokens"], entry["projected-rows"]) if size else {}
            )
            phases[phase] = {
                "flops": {**flops, "total": sum(flops.values())},
                "tokens": {"forward": entry["forward-tokens"], "backward": entry["backward-tokens"]},
                "projected_rows": entry["projected-rows"],
                "bytes": {"sent": entry["bytes_sent"], "received": entry["bytes_received"]},
                "messages": entry["messages"],
                "failed": entry.get("failed", 0),
                "peak_client_rss_bytes": entry["peak-rss-bytes"],
                "peak_client_cuda_bytes": entry["cuda-max-allocated-bytes"],
                "wall_s": seconds.get(phase, 0.0),
            }
        totals = {
            "flops": sum(p["flops"].get("total", 0.0) for p in phases.values()),
            "bytes_sent": sum(p["bytes"]["sent"] for p in phases.values()),
            "bytes_received": sum(p["bytes"]["received"] for p in phases.values()),
            "peak_client_rss_bytes": max((p["peak_client_rss_bytes"] for p in phases.values()), default=0),
            "peak_client_cuda_bytes": max((p["peak_client_cuda_bytes"] for p in phases.values()), default=0),
            "peak_server_rss_bytes": peak_rss_bytes(),
            "wall_s": sum(seconds.values()),
        }
        model = None if size is None else vars(size)
        return {"model": model, "phases": phases, "total": totals, "bytes_per_client": self.state["bytes_per_client"]}
