"""A Flower ``Grid`` whose nodes run the ClientApp in this process: the pipeline without Ray or a SuperLink.

Every pushed message is handled at once by ``clients.app.app`` (its mods included) in the
calling thread, with one ``Context`` per node that persists across messages, as a
simulation node's does. The pipeline and its phases are thus testable in seconds and
debuggable with a plain ``pdb``; the messages, records and handlers are the real ones.
A handler's exception becomes an error reply, as Flower's runtimes report it.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

ERROR_CODE = 1  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
FIRST_NODE_ID = 1001  # clear of the SuperLink's own id


def act_as_server() -> None:
    """Give this process a server's task identity, unless a Flower runtime already set one.

    ``Message(...)`` takes its run and source from the process's task identity, which
    Flower's runtimes set and a plain process (a script, a test) has not.
    """
    for name, value in (("run_id", 0), ("task_id", 0), ("node_id", SUPERLINK_NODE_ID)):
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    """``num_nodes`` nodes, numbered from ``FIRST_NODE_ID`` in partition order (``partition-id`` 0..)."""

    def __init__(self, num_nodes: int, run_config: dict[str, str] | None = None) -> None:
        from clients.app import app  # the client stack loads only when a grid is built

        self._app = app
        self._contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=0,
                node_id=FIRST_NODE_ID + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        act_as_server()
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=0)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=node) for node in self._contexts]

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(  # type: ignore[override]
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Handle every message now; its reply waits for ``pull_messages``."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            context = self._contexts.get(message.metadata.dst_node_id)
            if context is None:
                raise ValueError(
                    f"no node {message.metadata.dst_node_id} in this grid: it has {sorted(self._contexts)}"
                )
            try:
                reply = self._app(message, context)
            except Exception as e:  # a client's failure is its reply, as on a real runtime
                reason = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                reply = Message(Error(code=ERROR_CODE, reason=reason), reply_to=message)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
