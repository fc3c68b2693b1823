"""The client side of the secure affinity mode (``affinity.mode = "secure"``): SecAgg+ rounds and surrogate losses.

- The statistics: this client's released private-mode statistics (``elora_fed.privacy.mechanism``:
  noised if ``privacy`` is on), computed once per run (``StatisticsCache``: kept by the
  process and in the node's context state): the sketch phase computes them, and every
  SecAgg+ round of a subset holding this client and the loss query reuse them.
- SecAgg+: Flower's ``SecAggPlusWorkflow`` sends its four stages as plain ``train``
  messages carrying the ``secaggplus_configs`` record (the type is fixed in Flower), so
  ``clients.app.secure_statistics_mod``, a mod on the ``train`` handler only, sends those through
  Flower's ``secaggplus_mod`` and every other ``train`` message on to ordinary training.
  In the masked stage the mod calls ``secure_statistics_content``, which answers in the
  legacy FitRes format: parameters = this client's train statistics as one float64
  vector (``aggregation_vector``: count, gradient sum, curvature upper triangle),
  num_examples = 1. The mod quantizes that vector in [-clipping_range, clipping_range],
  masks it and sends only the masked integers; the plain vector never leaves.
  SecAgg+ computes sum(w x) / sum(w) with w = num_examples / max_weight; the server sets
  max_weight = 1, so every w is exactly 1 and the server multiplies the mean by the
  number of clients. A vector outside the clipping range is refused (a ``DataError``
  naming ``secagg.clipping_range``) rather than silently clipped into a wrong sum.
- ``query.surrogate_losses``: the server sends w_S of every subset holding this client
  (ArrayRecord ``surrogate``: ``w``, (m, d)); the client replies its validation loss at
  each, f^_i(S) (``quadratic_losses``, as the private-mode server computes it), and, with
  ``options.single``, its single-task estimate f^_i({i}) solved from its own statistics
  (``solve_subsets_private``: a sum over one client would hide nothing).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from clients.protocol import run_config
from elora_fed.config import RunConfig
from elora_fed.errors import DataError
from elora_fed.surrogate.quadratic_sums import quadratic_losses, solve_subsets_private, stack_statistics
from elora_fed.surrogate.statistics import (
    ClientStatistics,
    aggregation_vector,
    statistics_arrays,
    statistics_from_arrays,
)

Statistics = Callable[[RecordDict, Context], tuple[str, ClientStatistics, int]]
"""(request with the run config, context) -> (client id, statistics, rows projected to compute them now: 0 if cached)."""

FITINS_CONFIG = "fitins.config"  # where a legacy FitIns carries its config (``recorddict_compat``)


STATE_ARRAYS = "elora.statistics"  # the node's statistics, in its Context state (never sent)
STATE_KEY = "elora.statistics-settings"


class StatisticsCache:
    """A client's statistics for the current run settings, computed once per run: kept by the process and the node.

    The settings are everything the statistics depend on: model, adapter, data, sketch and
    privacy sections and the run seed (it seeds reproducible noise). A process keeps the
    statistics of the clients it served under the current settings (other settings clear
    it); the node keeps its own in its ``Context.state`` (Flower persists it per node and
    run, and it never leaves the node), so a process that has not served this client, or a
    deployed SuperNode that starts a fresh ClientApp process per message, reads them from
    there instead of recomputing. At d = 400 a client's statistics take 1.3 MB (float32),
    held once per process that served it and once in its node's state.
    """

    def __init__(self) -> None:
        self._settings: str | None = None
        self._stats: dict[str, ClientStatistics] = {}

    def get(
        self, config: RunConfig, client_id: str, context: Context, compute: Callable[[], tuple[ClientStatistics, int]]
    ) -> tuple[ClientStatistics, int]:
        """The kept statistics and 0, or ``compute()``'s (statistics, rows projected), which are then kept."""
        sections = ("model", "adapter", "data", "sketch", "privacy")
        flat = {k: v for k, v in config.to_flat().items() if k == "seed" or k.split(".")[0] in sections}
        settings = json.dumps(flat, sort_keys=True)
        if settings != self._settings:
            self._settings, self._stats = settings, {}
        key = f"{settings}|{client_id}"
        if client_id not in self._stats:
            state = context.state
            stored = state.config_records.get(STATE_KEY)
            if STATE_ARRAYS in state.array_records and stored is not None and stored.get("key") == key:
                arrays = {k: v.numpy() for k, v in state.array_records[STATE_ARRAYS].items()}
                self._stats[client_id] = statistics_from_arrays(arrays, config.sketch.dim)
            else:
                stats, rows = compute()
                state.array_records[STATE_ARRAYS] = ArrayRecord(
                    {k: Array(np.ascontiguousarray(v)) for k, v in statistics_arrays(stats).items()}
                )
                state.config_records[STATE_KEY] = ConfigRecord({"key": key})
                self._stats[client_id] = stats
                return stats, rows
        return self._stats[client_id], 0


def secure_statistics_content(content: RecordDict, context: Context, statistics: Statistics) -> RecordDict:
    """The masked stage's plain answer (FitRes records), which ``secaggplus_mod`` quantizes and masks."""
    if FITINS_CONFIG not in content.config_records:
        raise DataError("SecAgg+ request without its FitIns config (the run config)")
    request = RecordDict({"run": ConfigRecord(dict(content.config_records[FITINS_CONFIG]))})
    config = run_config(request)
    client_id, stats, rows = statistics(request, context)
    vector = aggregation_vector(stats.train)
    largest = float(np.abs(vector).max())
    if not np.isfinite(vector).all() or largest > config.secagg.clipping_range:
        raise DataError(
            f"client '{client_id}': a train statistic of magnitude {largest:.6g} exceeds secagg.clipping_range = "
            f"{config.secagg.clipping_range:g}; raise it (the quantization step grows with it)"
        )
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), num_examples=1, metrics={})
    reply = compat.fitres_to_recorddict(fitres, keep_input=False)
    reply["metrics"] = MetricRecord({"projected-rows": rows})
    return reply


def surrogate_losses_content(content: RecordDict, context: Context, statistics: Statistics) -> RecordDict:
    """f^_i(S) at every w_S the server sent, and (``options.single``) f^_i({i}); see the module docstring."""
    config = run_config(content)
    _, stats, rows = statistics(content, context)
    try:
        w = np.asarray(content.array_records["surrogate"]["w"].numpy(), dtype=np.float32)
        options = content.config_records["options"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"malformed surrogate-losses request: {type(e).__name__}: {e}") from e
    if w.ndim != 2 or w.shape[1] != stats.dim or not np.isfinite(w).all():
        raise DataError(f"malformed surrogate-losses request: w of shape {w.shape} for d = {stats.dim}")
    validation = stack_statistics([stats.validation], torch.device("cpu"), torch.float32)
    losses = quadratic_losses(validation, torch.as_tensor(w)[None])[0].numpy().astype(np.float64)
    arrays = {"losses": losses}
    if bool(options.get("single", False)):
        single = solve_subsets_private([stats], [(0,)], config.affinity.lam)
        arrays["single"] = np.asarray(single.losses[0, :1], dtype=np.float64)
    return RecordDict(
        {
            "surrogate": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"projected-rows": rows}),
        }
    )
