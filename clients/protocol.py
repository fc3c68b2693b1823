"""The message protocol between the server's phases and the ClientApp: records and their decoding.

Every request carries the run's resolved config as JSON in the ConfigRecord ``run``: the
server is the one source of the configuration (defaults, preset, ``--run-config`` and a
resumed run's saved config alike), so every launcher configures clients the same way.

- ``query.stats``: reply ``client`` (ConfigRecord: client id) and ``samples`` (MetricRecord:
  samples per split); with ``with-theta-star`` set, also ``theta-star`` (the initial adapter)
  and ``model-size`` (MetricRecord: base and adapter parameters, gradient length p).
- Every reply's MetricRecord ``metrics`` holds what the handler cost (``compute-s``, token
  positions forward and backward, projected rows, peak memory: ``elora_fed.accounting``).
- ``query.sketch``: reply ``sketch`` (ArrayRecord: split codes, sample indices, base outputs,
  projected gradients, labels) and ``sketch_meta`` (ConfigRecord: client id, settings); in
  private mode ``statistics`` (ArrayRecord: ``train.count``, ``train.grad``, ...) instead of
  ``sketch``; in secure mode only ``sketch_meta`` (the statistics stay on the client).
- Secure mode (``clients.secure``): SecAgg+ rounds are ``train`` messages with Flower's
  ``secaggplus_configs`` record (and, in the masked stage, a legacy FitIns whose config
  holds the run config as ``config``); ``query.surrogate_losses``: ``surrogate`` (``w``,
  the w_S of the client's subsets) and ``options`` (``single``); reply ``surrogate``
  (``losses``, and ``single``).
- Adapters travel packed: an ArrayRecord with one flat Array ``adapter``
  (``clients.records.adapter_record``), unpacked in the layout of ``theta-star``.
- ``train``: ``arrays`` (the adapter to start from) and ``config`` (local steps, lr, batch
  size, seed, objective ``fit`` or ``boost``; Flower strategies add ``server-round`` and,
  FedProx, ``proximal-mu``); a ``boost`` request also carries the group's ensemble.
  Reply ``arrays`` and ``metrics`` (``num-examples``, ``train-loss``, ``compute-s``).
- ``evaluate``: the ensemble (ArrayRecords ``group.G.base`` and ``group.G.boost.T``) and
  ``config`` (``split``; ``weights`` per group in ``groups`` order, or ``fit-weights``).
  Reply ``metrics``: ``loss``, ``accuracy``, ``num-examples`` (targets), ``weights``.
- ``query.boost``: one group's ensemble; reply ``boost`` (ArrayRecord: sample indices and
  residual targets r = 1 - p; with ``options.ridge-statistics`` also G^T G and G^T r of the
  projected gradients at theta*) and ``metrics`` (``loss`` per target over ``targets``
  targets: the group's training loss).

Decoding checks every field, so a malformed message is a named error, not a crash later.
This module holds the run config and plain fields, and imports no model code (the
ClientApp's routing uses it); ``clients.records`` encodes and decodes the model objects.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from elora_fed.config import RunConfig
from elora_fed.errors import DataError


def run_record(config: RunConfig) -> ConfigRecord:
    return ConfigRecord({"config": json.dumps(config.to_flat())})


def run_config(content: RecordDict) -> RunConfig:
    """The run config a request carries; ConfigError for bad keys or values, DataError if absent."""
    try:
        flat = json.loads(str(content.config_records["run"]["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"request without a readable run config: {type(e).__name__}: {e}") from e
    if not isinstance(flat, dict):
        raise DataError(f"request with a run config that is not a table of keys: {flat!r:.80}")
    return RunConfig.from_flat(flat)


MODEL_SIZE_KEYS = ("base-params", "adapter-params", "gradient-dim")
"""The ``model-size`` MetricRecord of a ``query.stats`` reply with theta*: what FLOPs are counted from."""

Metrics = dict[str, int | float | list[int] | list[float]]
"""What a MetricRecord holds."""


def number(record: ConfigRecord | MetricRecord, key: str, default: float | None = None) -> float:
    """A numeric field of a record; DataError naming the field if it is missing or not a number."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"malformed message: field '{key}' = {value!r} is not a number")
    return float(value)
