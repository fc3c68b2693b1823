"""``elora-fed supernode``: Flower's SuperNode loop with waits that back off from a fraction of a second."""

import importlib
import time
import types

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from clients.supernode import FLOWER_IDLE_POLL_S, SuperNodeVersionError, Waits, shorten_waits


def test_idle_waits_double_from_the_short_wait_up_to_flowers_and_restart_after_a_message():
    slept: list[float] = []
    waits = Waits(idle=0.05, reply=0.02, sleep=slept.append)
    for _ in range(9):
        waits.wait(FLOWER_IDLE_POLL_S)  # the loop's sleep after an empty pull
    waits.active()
    waits.wait(FLOWER_IDLE_POLL_S)
    waits.wait(0.5)  # the loop's wait for a reply
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0, 0.05, 0.02]


def test_the_installed_flower_loop_gets_the_short_waits():
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    fake = types.ModuleType(loop.__name__)
    for name in ("time", "_push_messages", "pull_objects", "start_client_internal"):
        setattr(fake, name, getattr(loop, name))
    slept: list[float] = []
    waits = Waits(idle=0.05, reply=0.05, sleep=slept.append)
    shorten_waits(fake, waits)
    fake.time.sleep(3)
    fake.time.sleep(3)
    assert slept == [0.05, 0.1] and fake.time.monotonic() > 0
    tries: list[int] = []

    def unavailable_once(object_id: str) -> bytes:
        tries.append(1)
        if len(tries) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    assert fake.pull_objects(["x"], pull_object_fn=unavailable_once) == {"x": b"content"}
    assert len(tries) == 2 and time.monotonic() - started < 0.5  # Flower's first retry waits 1 s


def test_a_flower_whose_loop_differs_is_refused_by_name():
    with pytest.raises(SuperNodeVersionError, match="_push_messages"):
        shorten_waits(types.ModuleType("flwr.supernode.start_client_internal"), Waits(idle=0.05, reply=0.05))
