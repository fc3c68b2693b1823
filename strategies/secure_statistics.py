"""The secure affinity mode (``affinity.mode = "secure"``): every subset's summed statistics by Flower's SecAgg+.

The private mode needs, for each sampled subset S, only the sum over S of the members'
additive train statistics (count, gradient sum, curvature sum), plus each member's
validation loss at the subset's solution w_S. Here the server gets the sums from one
round of secure aggregation per subset, among the subset's clients, and never sees one
client's statistics; each member evaluates its own validation loss at the w_S the server
sends (``query.surrogate_losses``), and its single-task estimate from its own statistics
(a secure sum over one client would hide nothing). ``SecureStatistics`` plugs that into
the same solver as the private mode (``elora_fed.surrogate.affinity.affinity_from_subset_sums``),
so the two modes differ only by SecAgg+'s quantization (``secagg.*``).

Driving Flower 1.42's SecAgg+ from this ServerApp. ``flwr.server.workflow.SecAggPlusWorkflow``
is written for the legacy strategy API: it needs a ``LegacyContext`` whose strategy's
``configure_fit`` picks the clients and builds their FitIns, and whose ``aggregate_fit``
receives the unmasked result; the current round and parameters are read from the
context's state. It talks to the clients through ``grid.send_and_receive`` in four
stages of ``train`` messages: setup (public keys), share keys (encrypted key shares,
forwarded by the server), collect masked vectors (the FitIns and the clients' masked,
quantized vectors) and unmask (shares of the masks' seeds). ``_SubsetSum`` is a legacy
strategy for one fixed node set: ``configure_fit`` returns those nodes with a FitIns
holding the run config, and ``aggregate_fit`` keeps the result. SecAgg+ computes the
weighted mean sum(w_i x_i) / sum(w_i), w_i = num_examples / max_weight quantized; clients
send num_examples = 1 (``clients.secure``) and max_weight is 1, so every w_i is exactly 1
and the sum is that mean times the number of clients that took part. A subset in which
any client drops out fails (a DataError naming it): SecAgg+ would otherwise return the
sum over the survivors.

Subsets that share no client run at the same time (threads, each with its own workflow),
at most max(1, ``federation.max_in_flight`` // subset size) at once (all of them at once
when ``max_in_flight`` is 0); a client takes part in one subset at a time, because
``secaggplus_mod`` keeps its protocol state in the node's context. SecAgg+ traffic is
booked in the run's ledger under the current phase.

What the server learns, and what it does not protect: the sum over every sampled subset
(that is the point). Sums over overlapping subsets can be differenced: once the subsets'
membership matrix has rank n (pair-covering subsets almost always do), a server that
solves the linear system recovers every client's statistics. Secure aggregation alone
therefore hides a client's statistics only when subsets are few or disjoint; combine it
with ``privacy`` noise (noised on each client before quantization) for a guarantee. The
per-member validation losses f^_i(S) and singles f^_i({i}) are sent in the clear, as the
affinity needs them, and every member learns w_S of its subsets. Boosting in this mode
still asks each client for its ridge statistics (as the private mode does): it is not
secure-aggregated yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.typing import EvaluateIns, EvaluateRes
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from clients.protocol import run_record
from elora_fed.errors import DataError
from elora_fed.surrogate.quadratic_sums import SubsetSums, stack_statistics
from elora_fed.surrogate.statistics import SplitStatistics, statistics_from_aggregate
from elora_fed.surrogate.subset_batches import SubsetEstimates
from strategies.federation import Federation, GroupGrid
from strategies.messaging import Exchange, console, content_bytes


class _SubsetSum(Strategy):
    """A legacy strategy for one SecAgg+ round over fixed nodes: picks them, keeps the unmasked result."""

    def __init__(self, grid: Grid, node_ids: Sequence[int], run_config_json: str) -> None:
        self.grid, self.node_ids, self.run_config_json = grid, list(node_ids), run_config_json
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures: list[tuple[ClientProxy, FitRes] | BaseException] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        ins = FitIns(parameters, {"config": self.run_config_json})
        return [(GridClientProxy(node, self.grid, 0), ins) for node in self.node_ids]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results, self.failures = results, failures
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _BookedGrid(GroupGrid):
    """The federation's grid, booking every SecAgg+ exchange in the ledger (thread-safe)."""

    def __init__(self, fed: Federation, label: str) -> None:
        super().__init__(fed.grid, list(fed.node_of.values()))
        self.fed, self.label = fed, label
        self.lock = threading.Lock()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        start = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        ok = [r for r in replies if not r.has_error()]
        answered = {r.metadata.src_node_id for r in replies}
        result = Exchange(
            label=self.label,
            replies=ok,
            failures=[f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()],
            failed_nodes=sorted(
                {r.metadata.src_node_id for r in replies if r.has_error()}
                | {m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered}
            ),
            sent=len(messages),
            seconds=time.perf_counter() - start,
            bytes_sent={m.metadata.dst_node_id: content_bytes(m) for m in messages},
            bytes_received={r.metadata.src_node_id: content_bytes(r) for r in ok},
        )
        with self.lock:
            self.fed.ledger.record(self.fed.phase, result, {n: c for c, n in self.fed.node_of.items()})
        return replies


def secure_sum(fed: Federation, grid: Grid, node_ids: Sequence[int], round_id: int = 1) -> np.ndarray:
    """The sum of the clients' ``aggregation_vector``s over ``node_ids``, by one SecAgg+ round.

    Exact up to quantization: each entry is off by less than len(node_ids) * 2 *
    secagg.clipping_range / secagg.quantization_range. DataError if not every client took part.
    """
    sa, config = fed.config.secagg, fed.config
    if len(node_ids) < 2:
        raise DataError(f"secure aggregation needs at least 2 clients, got {len(node_ids)}")
    strategy = _SubsetSum(grid, node_ids, str(run_record(config)["config"]))
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_id})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=sa.num_shares,
        reconstruction_threshold=sa.reconstruction_threshold,
        max_weight=1.0,
        clipping_range=sa.clipping_range,
        quantization_range=sa.quantization_range,
        modulus_range=sa.modulus_range,
        timeout=config.federation.timeout_s,
    )
    workflow(grid, context)
    results = strategy.results or []
    if len(results) != len(node_ids):
        reasons = "; ".join(str(f) for f in strategy.failures[:2]) or "a client dropped out or SecAgg+ halted"
        raise DataError(
            f"secure aggregation over nodes {sorted(node_ids)}: {len(results)} of {len(node_ids)} clients took part "
            f"({reasons}); every member of a subset must answer"
        )
    (mean,) = parameters_to_ndarrays(results[0][1].parameters)
    return np.asarray(mean, dtype=np.float64) * len(results)


def disjoint_waves(subsets: Sequence[Sequence[int]], width: int) -> list[list[int]]:
    """Subset indices in waves of at most ``width`` subsets that share no member (first fit, in order)."""
    waves: list[list[int]] = []
    used: list[set[int]] = []
    for k, subset in enumerate(subsets):
        members = set(subset)
        for wave, taken in zip(waves, used, strict=True):
            if len(wave) < width and not taken & members:
                wave.append(k)
                taken |= members
                break
        else:
            waves.append([k])
            used.append(members)
    return waves


class SecureStatistics(SubsetSums):
    """``SubsetSums`` of the secure mode: SecAgg+ sums per subset, validation losses from the clients themselves.

    ``client_ids`` fixes the client order (subset members are indices into it).
    """

    chunk_size = 256  # subsets summed (in waves) and solved at a time: 256 sums of d = 400 take 164 MB

    def __init__(self, fed: Federation, client_ids: Sequence[str]) -> None:
        self.fed, self.client_ids = fed, list(client_ids)
        self.num_clients, self.dim = len(self.client_ids), fed.config.sketch.dim
        self.done = 0
        self.started = time.perf_counter()

    def train_sums(self, subsets: Sequence[tuple[int, ...]]) -> SplitStatistics:
        config = self.fed.config
        nodes = [[self.fed.node_of[self.client_ids[i]] for i in s] for s in subsets]
        in_flight = config.federation.max_in_flight
        width = max(1, in_flight // max(map(len, subsets))) if in_flight > 0 else len(subsets)
        grid = _BookedGrid(self.fed, "secure sums")
        sums: list[np.ndarray] = [np.zeros(0)] * len(subsets)
        with ThreadPoolExecutor(min(width, len(subsets))) as pool:
            for wave in disjoint_waves(subsets, width):
                rounds = [self.done + k + 1 for k in wave]
                for k, total in zip(
                    wave, pool.map(lambda k, r: secure_sum(self.fed, grid, nodes[k], r), wave, rounds), strict=True
                ):
                    sums[k] = total
        self.done += len(subsets)
        console.log(f"secure sums: {self.done} subsets so far, {time.perf_counter() - self.started:.1f} s")
        splits = [statistics_from_aggregate(v, self.dim) for v in sums]
        return stack_statistics(splits, self.device, torch.float64)

    def member_losses(self, subsets: Sequence[tuple[int, ...]], w: torch.Tensor, workers: int) -> np.ndarray:
        """Each client evaluates its validation quadratic at the w_S of its subsets."""
        held: dict[int, list[tuple[int, int]]] = {}
        for k, subset in enumerate(subsets):
            for j, i in enumerate(subset):
                held.setdefault(i, []).append((k, j))
        membership = np.zeros((len(subsets), self.num_clients))
        for k, subset in enumerate(subsets):
            membership[k, list(subset)] = 1
        rank = int(np.linalg.matrix_rank(membership))
        note = (
            ": they determine each client's statistics by differencing (add privacy noise)"
            if rank == self.num_clients
            else ""
        )
        console.log(
            f"secure sums of {len(subsets)} subsets: membership rank {rank} of {self.num_clients} clients{note}"
        )
        w_np = w.cpu().numpy().astype(np.float32)
        replies = self._ask({i: w_np[[k for k, _ in pairs]] for i, pairs in held.items()}, single=False)
        losses = np.full((len(subsets), max(map(len, subsets))), np.nan)
        for i, pairs in held.items():
            values = replies[i]["losses"]
            if values.shape != (len(pairs),):
                raise DataError(f"surrogate losses of '{self.client_ids[i]}': {values.shape}, expected ({len(pairs)},)")
            for (k, j), value in zip(pairs, values, strict=True):
                losses[k, j] = value
        return losses

    def singles(self, lam: float) -> SubsetEstimates:
        """Each client's f^_i({i}), solved by the client from its own statistics; w_i stays there (NaN here)."""
        empty = np.zeros((0, self.dim), dtype=np.float32)
        replies = self._ask(dict.fromkeys(range(self.num_clients), empty), single=True)
        singles = np.array([[float(replies[i]["single"].reshape(-1)[0])] for i in range(self.num_clients)])
        n = self.num_clients
        return SubsetEstimates(
            tuple((i,) for i in range(n)),
            float(lam),
            torch.full((n, self.dim), torch.nan),
            singles,
            np.ones(n, dtype=np.int64),
            np.full(n, np.nan),
        )

    def _ask(self, w_of: dict[int, np.ndarray], single: bool) -> dict[int, dict[str, np.ndarray]]:
        """One ``query.surrogate_losses`` exchange; every asked client must answer."""
        messages = []
        for i, w in w_of.items():
            records: dict[str, ArrayRecord | ConfigRecord] = {
                "surrogate": ArrayRecord({"w": Array(np.ascontiguousarray(w))}),
                "options": ConfigRecord({"single": single}),
            }
            messages.extend(self.fed.requests([self.client_ids[i]], "query.surrogate_losses", records))
        label = "surrogate singles" if single else "surrogate losses"
        result = self.fed.exchange(messages, label, retries=self.fed.config.federation.retries)
        index = {c: i for i, c in enumerate(self.client_ids)}
        replies = {
            index[self.fed.client_of(r)]: {k: v.numpy() for k, v in r.content.array_records["surrogate"].items()}
            for r in result.replies
        }
        missing = sorted(self.client_ids[i] for i in set(w_of) - set(replies))
        if missing:
            raise DataError(
                f"{label}: {len(missing)} clients did not answer (e.g. '{missing[0]}'): {result.failures[:2]}"
            )
        return replies
