"""Simulated dropout: a ClientApp mod that makes this client fail requests at random.

With ``federation.drop_rate = p`` every request the server marks as part of an exchange
(the ``exchange`` ConfigRecord: label and attempt, set by ``strategies.federation``) fails
with probability p, decided by a hash of (run seed, exchange label, attempt, partition id):
reproducible, independent across clients, rounds and retries. The failure is an exception,
which Flower turns into an error reply, exactly as a crashed client looks to the server.
Node discovery carries no such record and never fails.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.protocol import number, run_config
from elora_fed.errors import EloraFedError
from elora_fed.seeds import derive_seed


class SimulatedDropout(EloraFedError):
    """Raised by a client that drops out of a request (``federation.drop_rate``)."""


def dropped(seed: int, label: str, attempt: int, partition: int, rate: float) -> bool:
    """Whether the client at ``partition`` drops out of this attempt of exchange ``label``."""
    if rate <= 0:
        return False
    # sha256 (derive_seed), not crc32: draws for attempt 0 and 1 must not correlate, or a
    # retry would fail far more often than p.
    return derive_seed(seed, label, attempt, partition, bits=64) / 2**64 < rate


def simulated_dropout(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Fail this request with probability ``federation.drop_rate``; otherwise handle it."""
    stamp = message.content.config_records.get("exchange")
    if stamp is not None:
        config = run_config(message.content)
        label, attempt = str(stamp.get("label", "")), int(number(stamp, "attempt", 0))
        partition = int(str(context.node_config.get("partition-id", 0)))
        if dropped(config.seed, label, attempt, partition, config.federation.drop_rate):
            raise SimulatedDropout(f"simulated dropout of partition {partition} in '{label}' (attempt {attempt})")
    return call_next(message, context)
