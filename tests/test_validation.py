"""Server-side screening of client updates (``strategies.validation``): every malformed kind is
rejected and counted, and aggregating what passes equals aggregating the valid updates alone."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from clients.records import ADAPTER_ARRAY, adapter_from, adapter_record
from strategies.validation import KINDS, UpdateLimits, rejection, screen

SENT = {"layer.lora_A.weight": torch.randn(2, 8), "layer.lora_B.weight": torch.zeros(8, 2)}
LIMITS = UpdateLimits(max_update_norm=10.0, max_payload_bytes=2**20)

# Messages built outside a Flower process need a task identity, as the server's process has.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def reply(arrays=None, examples=5, **extra) -> Message:
    state = {k: v + 0.01 for k, v in SENT.items()} if arrays is None else arrays
    records = {"arrays": adapter_record(state) if isinstance(state, dict) else state, **extra}
    if examples is not None:
        records["metrics"] = MetricRecord({"num-examples": examples, "train-loss": 1.0})
    return Message(RecordDict(records), dst_node_id=0, message_type="train")


def changed(key: str, value) -> dict:
    return {**{k: v.clone() for k, v in SENT.items()}, key: value}


A, B = "layer.lora_A.weight", "layer.lora_B.weight"
SIZE = sum(t.numel() for t in SENT.values())

MALFORMED = {
    "oversized payload": ("payload", reply(padding=ConfigRecord({"x": b"0" * 2**21}))),
    "no num-examples": ("num-examples", reply(examples=None)),
    "zero num-examples": ("num-examples", reply(examples=0)),
    "NaN num-examples": ("num-examples", reply(examples=float("nan"))),
    "unpacked, key by key": ("keys", reply(ArrayRecord({k: v.clone() for k, v in SENT.items()}))),
    "extra array": (
        "keys",
        reply(ArrayRecord({ADAPTER_ARRAY: Array(torch.zeros(SIZE).numpy()), A: Array(SENT[A].numpy())})),
    ),
    "extra array record": ("keys", reply(more=ArrayRecord({A: SENT[A].clone()}))),
    "float64": ("dtype", reply({k: v.double() for k, v in SENT.items()})),
    "a tensor missing": ("shape", reply({A: SENT[A].clone()})),
    "truncated bytes": (
        "decode",
        reply(ArrayRecord({ADAPTER_ARRAY: Array("float32", (SIZE,), "numpy.ndarray", b"\x00" * 8)})),
    ),
    "NaN": ("non-finite", reply(changed(B, torch.full((8, 2), float("nan"))))),
    "Inf": ("non-finite", reply(changed(B, torch.full((8, 2), float("inf"))))),
    "huge update": ("norm", reply(changed(B, torch.full((8, 2), 100.0)))),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_update_is_rejected_for_its_reason(case):
    kind, message = MALFORMED[case]
    assert rejection(message, SENT, LIMITS) == kind


def test_valid_updates_pass():
    assert rejection(reply(), SENT, LIMITS) is None
    assert rejection(reply(examples=3.0), SENT, LIMITS) is None


def test_screening_counts_every_kind_and_leaves_the_aggregate_to_the_valid_updates():
    good = [reply({k: v + 0.01 * (i + 1) for k, v in SENT.items()}, examples=i + 1) for i in range(3)]
    bad = [message for _, message in MALFORMED.values()]
    mixed = [bad[0], good[0], *bad[1:7], good[1], *bad[7:], good[2]]
    accepted, rejected = screen(mixed, SENT, LIMITS)
    assert accepted == good
    expected = {}
    for kind, _ in MALFORMED.values():
        expected[kind] = expected.get(kind, 0) + 1
    assert dict(rejected) == expected and set(rejected) == set(KINDS)
    screened, _ = FedAvg().aggregate_train(1, accepted)
    clean, _ = FedAvg().aggregate_train(1, good)
    screened_state, clean_state = adapter_from(screened, SENT), adapter_from(clean, SENT)
    for key, value in clean_state.items():
        torch.testing.assert_close(screened_state[key], value)
    weights = np.array([1, 2, 3]) / 6  # FedAvg weighs by num-examples, element by element of the packed adapter
    for key in SENT:
        manual = sum(w * (SENT[key] + 0.01 * (i + 1)) for i, w in enumerate(weights))
        torch.testing.assert_close(screened_state[key], manual.float())
