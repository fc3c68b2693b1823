"""A SuperNode that answers within a fraction of a second: Flower's, with shorter waits.

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) waits a fixed 3 s after
every empty pull from the SuperLink, 0.5 s between checks for its ClientApp's reply, and
1 s (doubling) before it retries an object of a message that the server has not finished
pushing; its SuperExec waits 1 s between checks for work
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``). In a pipeline whose server sends the next message
as soon as a reply arrives, the pull right after a reply is empty, so each message pays the
full 3 s, then often a second for its objects and up to one before its ClientApp starts
(``experiments/deployment_overhead.py`` measures it).

``elora-fed supernode ARGS`` runs the same SuperNode (every ``flower-supernode`` option)
with:

- an idle wait that backs off: ``--idle-poll-s`` after a message, growing by
  ``--idle-backoff`` (1.25) on every empty pull up to Flower's 3 s, so an idle node costs
  the SuperLink what Flower's does, and a message that arrives g seconds after the last
  waits at most (backoff - 1) g to be picked up (doubling wasted up to g: the server's
  work between messages is often a second);
- replies checked, and a message's missing objects first retried, after ``--reply-poll-s``
  (the retries then double, as Flower's do), in the SuperNode and in its prestarted
  ClientApps, which pull a message's objects from the SuperNode while it still pulls them
  from the SuperLink;
- its SuperExec's poll interval ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` set to
  ``--reply-poll-s`` unless the environment sets it;
- its SuperExec started as ``python -m clients.prestarted superexec``, which hands each
  message to a ClientApp process started, and Flower imported, before the message came
  (``clients/prestarted.py``); ``--no-prestart`` keeps Flower's ``flower-superexec``.

The waits are module attributes of Flower 1.42's SuperNode loop; on a Flower whose loop
differs, the command refuses to start and names the missing piece, rather than running
with Flower's waits unnoticed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from elora_fed.errors import EloraFedError

FLOWER_IDLE_POLL_S = 3.0
"""Flower 1.42's fixed wait after an empty pull (``start_client_internal.py``); the backoff's ceiling."""

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
OBJECT_RETRY_ENV = "ELORA_FED_OBJECT_RETRY_S"
"""The first retry of a message object, in seconds, for the prestarted ClientApps (``clients/prestarted.py``)."""


class SuperNodeVersionError(EloraFedError):
    """The installed Flower's SuperNode loop is not the one these shorter waits were written for."""


@dataclass
class Waits:
    """How long the SuperNode loop really sleeps when it asks to (``_TimeModule`` routes its sleeps here).

    Flower's loop sleeps ``FLOWER_IDLE_POLL_S`` after an empty pull and 0.5 s in its other
    waits (a reply, an object's content). An idle sleep here is ``idle`` after activity,
    multiplied by ``growth`` on every consecutive one up to Flower's; any other is at most
    ``reply``.
    """

    idle: float
    reply: float
    growth: float = 1.25
    sleep: Callable[[float], None] = time.sleep
    _next_idle: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next_idle = self.idle

    def wait(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_POLL_S:
            self.sleep(self._next_idle)
            self._next_idle = min(self.growth * self._next_idle, FLOWER_IDLE_POLL_S)
        else:
            self.sleep(min(seconds, self.reply))

    def active(self) -> None:
        """A message arrived: the next empty pull waits ``idle`` again."""
        self._next_idle = self.idle


def _require(loop: ModuleType, needed: Sequence[str]) -> None:
    missing = [name for name in needed if not hasattr(loop, name)]
    if missing:
        raise SuperNodeVersionError(
            f"{loop.__name__} has no {', '.join(missing)}: this Flower's SuperNode loop is not Flower 1.42's; "
            "run flower-supernode instead"
        )


def shorten_waits(loop: ModuleType, waits: Waits) -> None:
    """Make Flower's SuperNode loop ``loop`` sleep through ``waits`` and report activity to it."""
    _require(loop, ("time", "_push_messages", "pull_objects", "start_client_internal"))
    push = loop._push_messages

    def push_and_reset(*args: Any, **kwargs: Any) -> None:
        waits.active()
        push(*args, **kwargs)

    setattr(loop, "time", _TimeModule(waits))  # noqa: B010 (module attributes, set by name)
    setattr(loop, "_push_messages", push_and_reset)  # noqa: B010
    setattr(loop, "pull_objects", retrying_after(loop.pull_objects, waits.reply))  # noqa: B010


def retrying_after(pull: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """Flower's object pull ``pull``, whose first retry of an object not there yet comes after ``seconds``.

    Flower's pulls (``flwr.supercore.inflatable.inflatable_utils``) first retry after 1 s
    (``PULL_INITIAL_BACKOFF``), then double; a message is announced before its objects have
    all arrived, so a pull that starts at once often pays that second.
    """

    def pull_soon(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", seconds)
        return pull(*args, **kwargs)

    return pull_soon


class _TimeModule:
    """What ``import time`` gives the loop: ``sleep`` through ``Waits``, the rest unchanged."""

    def __init__(self, waits: Waits) -> None:
        self._waits = waits

    def sleep(self, seconds: float) -> None:
        self._waits.wait(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def prestart_clientapps(loop: ModuleType) -> None:
    """Make Flower's SuperNode loop ``loop`` start ``clients.prestarted``'s SuperExec instead of ``flower-superexec``."""
    _require(loop, ("subprocess",))
    setattr(loop, "subprocess", _SubprocessModule())  # noqa: B010


class _SubprocessModule:
    """What ``import subprocess`` gives the loop: ``Popen`` of ``flower-superexec`` started as ours, the rest Flower's."""

    def Popen(self, command: list[str], *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        if command[:1] == ["flower-superexec"]:
            command = [sys.executable, "-m", "clients.prestarted", "superexec", *command[1:]]
        return subprocess.Popen(command, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def run(argv: Sequence[str], idle_poll_s: float, reply_poll_s: float, prestart: bool, idle_backoff: float) -> None:
    """``flower-supernode ARGV`` with the shorter waits, and prestarted ClientApps (blocks until it exits)."""
    if idle_poll_s <= 0 or reply_poll_s <= 0:
        raise EloraFedError(f"poll intervals must be positive, got idle {idle_poll_s}, reply {reply_poll_s}")
    if idle_backoff < 1:
        raise EloraFedError(f"--idle-backoff must be at least 1 (the wait's growth per empty pull), got {idle_backoff}")
    from flwr.supernode.cli import flower_supernode

    loop = importlib.import_module("flwr.supernode.start_client_internal")  # the module, not its function
    shorten_waits(loop, Waits(idle=idle_poll_s, reply=reply_poll_s, growth=idle_backoff))
    if prestart:
        prestart_clientapps(loop)
    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(reply_poll_s))  # the SuperExec child inherits it
    os.environ.setdefault(OBJECT_RETRY_ENV, str(reply_poll_s))  # and its ClientApp processes
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
