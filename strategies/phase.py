"""The phase protocol: a phase builds requests from the run state and folds the replies back into it.

A phase is a class ``Phase(run, fed)`` whose ``steps()`` is a generator: it yields a
``Request`` (the messages for its clients, a label, how often to retry), and gets back the
``Exchange`` of replies, in the spirit of Flower's ``configure_*`` / ``aggregate_*``. The
driver (``drive``) owns the exchange itself: sending, timeouts, retries, the
``federation.min_fraction`` check and the cost ledger (``Federation.exchange``). Because
a phase never touches the grid, it runs the same against Ray, a deployment or an
in-process grid (``strategies.in_process``), and a test can answer its requests by hand.

The pipeline (``strategies.pipeline``) runs the phases named in ``strategies.*`` in order,
timing each and checkpointing after each (``RunState.complete``); a phase that spans
many exchanges (training rounds, boosting steps) logs and checkpoints its own progress
through ``RunState`` so a resumed run continues inside it.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from flwr.app import Message

from strategies.messaging import Exchange

if TYPE_CHECKING:
    from strategies.federation import Federation
    from strategies.run_state import RunState

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """One exchange a phase asks for: its messages, the label progress and logs show, and its retries.

    Retry (``retries > 0``) only idempotent requests: queries and evaluation.
    """

    messages: list[Message]
    label: str
    retries: int = 0


Steps = Generator[Request, Exchange, T]
"""A phase's (or a helper's) steps: yields requests, receives their exchanges, returns a value."""


class Phase(Protocol):
    """One pipeline phase over the run state (see the module docstring)."""

    def __init__(self, run: RunState, fed: Federation) -> None: ...

    def steps(self) -> Steps[None]: ...


def drive(steps: Steps[T], fed: Federation) -> T:
    """Run ``steps`` to the end, answering each request with ``fed.exchange``; returns what they return."""
    try:
        request = next(steps)
        while True:
            request = steps.send(fed.exchange(request.messages, request.label, retries=request.retries))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
