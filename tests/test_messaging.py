"""The server's exchange of messages: how often it checks for replies."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict

from elora_fed.config import FederationConfig
from elora_fed.errors import ConfigError
from strategies.in_process import FIRST_NODE_ID, InProcessGrid
from strategies.messaging import exchange


class SlowNode(InProcessGrid):
    """One node whose reply, an empty echo, is there only from the ``ready_at``-th check on."""

    def __init__(self, ready_at: int) -> None:
        super().__init__(1)
        self.ready_at, self.pulls = ready_at, 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = f"m{len(self._replies)}"
            self._replies[message_id] = Message(RecordDict(), reply_to=message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        return super().pull_messages(message_ids) if self.pulls >= self.ready_at else []


def test_the_server_checks_for_replies_every_poll_s_and_stops_at_the_reply():
    grid = SlowNode(ready_at=4)
    message = Message(RecordDict(), dst_node_id=FIRST_NODE_ID, message_type="query.stats")
    start = time.perf_counter()
    result = exchange(grid, [message], "echo", FederationConfig(poll_s=0.25))
    assert len(result.replies) == 1 and not result.failures
    assert grid.pulls == 4  # three empty checks, then the reply: no check after it
    assert time.perf_counter() - start >= 3 * 0.25  # a wait of poll_s after each empty check


def test_a_poll_interval_that_is_not_positive_is_refused():
    with pytest.raises(ConfigError, match="federation.poll_s"):
        FederationConfig(poll_s=0.0)
