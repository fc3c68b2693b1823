"""Screening client updates before they reach an aggregation strategy.

A training reply is accepted only if it is what the server asked for: a payload within
``federation.max_payload_mb``, a positive finite ``num-examples``, the adapter as one flat
Array in the ArrayRecord ``arrays`` (``clients.records.adapter_record``) with the sent
adapter's dtype and size, finite values, and a change of the adapter whose L2 norm is at
most ``federation.max_update_norm``. Anything else is rejected under the first rule it breaks
(``KINDS``), counted, and never passed to the strategy, so it cannot touch a global
adapter. Flower's own strategies assume well-formed replies; this is where they get them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from clients.records import ADAPTER_ARRAY, flat_adapter
from elora_fed.config import FederationConfig
from elora_fed.ensemble.outputs import AdapterState
from strategies.messaging import content_bytes

KINDS = ("payload", "num-examples", "keys", "dtype", "shape", "decode", "non-finite", "norm")
"""Rejection reasons, in the order they are checked."""


@dataclass(frozen=True)
class UpdateLimits:
    """The bounds an update must satisfy (from ``federation.*``)."""

    max_update_norm: float
    max_payload_bytes: int

    @classmethod
    def from_config(cls, federation: FederationConfig) -> UpdateLimits:
        return cls(federation.max_update_norm, int(federation.max_payload_mb * 2**20))


def rejection(reply: Message, sent: AdapterState, limits: UpdateLimits) -> str | None:
    """The first rule of ``KINDS`` that ``reply`` breaks as an update of ``sent``, or None if it is valid."""
    return _rejection(reply, flat_adapter(sent), limits)


def _rejection(reply: Message, reference: np.ndarray, limits: UpdateLimits) -> str | None:
    if content_bytes(reply) > limits.max_payload_bytes:
        return "payload"
    metrics = reply.content.metric_records.get("metrics")
    examples = None if metrics is None else metrics.get("num-examples")
    if isinstance(examples, bool) or not isinstance(examples, int | float) or not 0 < examples < math.inf:
        return "num-examples"
    records = reply.content.array_records
    if list(records) != ["arrays"] or list(records["arrays"]) != [ADAPTER_ARRAY]:
        return "keys"
    array = records["arrays"][ADAPTER_ARRAY]
    if array.dtype != str(reference.dtype):
        return "dtype"
    if tuple(array.shape) != reference.shape:
        return "shape"
    try:
        values = array.numpy()
    except Exception:  # numpy raises ValueError, EOFError, ... for bytes that are not an array
        return "decode"
    if values.shape != reference.shape:
        return "decode"
    if not np.isfinite(values).all():
        return "non-finite"
    if float(np.linalg.norm(values.astype(np.float64) - reference)) > limits.max_update_norm:
        return "norm"
    return None


def screen(replies: Sequence[Message], sent: AdapterState, limits: UpdateLimits) -> tuple[list[Message], Counter[str]]:
    """The valid replies, in order, and the number rejected per kind."""
    accepted: list[Message] = []
    rejected: Counter[str] = Counter()
    reference = flat_adapter(sent)  # once per screen, not once per reply
    for reply in replies:
        kind = _rejection(reply, reference, limits)
        if kind is None:
            accepted.append(reply)
        else:
            rejected[kind] += 1
    return accepted, rejected
