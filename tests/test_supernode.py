"""``elora-fed supernode``: Flower's SuperNode loop with waits that back off from a fraction of a second."""

import importlib
import time
import types

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from clients.prestarted import retry_objects_soon
from clients.supernode import FLOWER_IDLE_POLL_S, OBJECT_RETRY_ENV, SuperNodeVersionError, Waits, shorten_waits
from strategies.in_process import act_as_server


def test_idle_waits_grow_from_the_short_wait_up_to_flowers_and_restart_after_a_message():
    slept: list[float] = []
    waits = Waits(idle=0.05, reply=0.02, growth=2.0, sleep=slept.append)
    for _ in range(9):
        waits.wait(FLOWER_IDLE_POLL_S)  # the loop's sleep after an empty pull
    waits.active()
    waits.wait(FLOWER_IDLE_POLL_S)
    waits.wait(0.5)  # the loop's wait for a reply
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0, 0.05, 0.02]


def test_the_default_idle_growth_picks_a_message_up_within_a_quarter_of_its_delay():
    slept: list[float] = []
    waits = Waits(idle=0.05, reply=0.05, sleep=slept.append)
    for _ in range(40):
        waits.wait(FLOWER_IDLE_POLL_S)
    pulls = np.cumsum(slept)  # when the empty pulls come, from the last message on
    for delay in (0.3, 1.0, 2.5):  # a message that arrives this long after the last is picked up at the next pull
        assert pulls[np.searchsorted(pulls, delay)] - delay <= 0.25 * delay + 0.05
    assert sum(pulls < 3.0) <= 13  # while a node with doubling waits would pull 6 times in those 3 s


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
    assert slept == [0.05, 0.0625] and fake.time.monotonic() > 0
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


def test_a_prestarted_clientapp_retries_a_message_object_not_there_yet_within_the_short_wait(monkeypatch):
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    fake = types.ModuleType(runtime.__name__)
    fake.pull_and_inflate_object_from_tree = runtime.pull_and_inflate_object_from_tree  # type: ignore[attr-defined]
    monkeypatch.setenv(OBJECT_RETRY_ENV, "0.02")
    retry_objects_soon(fake)
    act_as_server()  # a Message takes its run from the process's task identity
    message = Message(RecordDict({"x": ArrayRecord({"w": Array(np.arange(4.0))})}), dst_node_id=1, message_type="train")
    contents = {i: o.deflate() for i, o in get_all_nested_objects(message).items()}
    missing_once = set(contents)

    def pull(object_id: str) -> bytes:
        if object_id in missing_once:  # the SuperNode has not pulled it from the SuperLink yet
            missing_once.discard(object_id)
            raise ObjectUnavailableError(object_id)
        return contents[object_id]

    started = time.monotonic()
    pulled = fake.pull_and_inflate_object_from_tree(get_object_tree(message), pull, lambda _: None, return_type=Message)
    assert not missing_once and time.monotonic() - started < 0.5  # Flower's first retry waits 1 s
    np.testing.assert_array_equal(pulled.content["x"]["w"].numpy(), np.arange(4.0))
