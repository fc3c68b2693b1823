"""The ClientApp's handlers called with real Flower records and Context, and the wire formats."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from clients import handlers as client_app
from clients import node as client_node
from clients.protocol import run_config, run_record
from clients.records import (
    adapter_from,
    adapter_record,
    ensemble_from,
    ensemble_records,
    sketch_from_record,
    sketch_to_record,
)
from elora_fed.config import RunConfig
from elora_fed.data.federated_data import load_clients
from elora_fed.ensemble.boosting import ridge_statistics
from elora_fed.ensemble.outputs import GroupAdapters
from elora_fed.errors import DataError
from elora_fed.model.adapters import attach_lora
from elora_fed.model.models import load_base_model, load_tokenizer
from elora_fed.sketch.client_sketch import SketchMetadata, sketch_client
from elora_fed.sketch.gradients import gradient_dim
from elora_fed.sketch.projection import JLProjector

CONFIG = RunConfig.from_flat(  # fp32 compute: replies are compared with direct fp32 computations
    {
        "model.name": "tiny-random",
        "model.compute_dtype": "fp32",
        "data.num_clients": 3,
        "data.max_samples_per_client": 12,
        "sketch.dim": 16,
    }
)


def context(partition: int) -> Context:
    node_config = {"partition-id": partition, "num-partitions": 3}
    return Context(run_id=1, node_id=10 + partition, node_config=node_config, state=RecordDict(), run_config={})


def request(**records) -> RecordDict:
    """A request as the server sends it: the run config plus the phase's records."""
    return RecordDict({"run": run_record(CONFIG), **records})


def theta_star():
    content = client_app.stats_content(request(options=ConfigRecord({"with-theta-star": True})), context(0))
    return content.array_records["theta-star"].to_torch_state_dict()


def test_sketch_query_replies_with_this_clients_sketch_and_reuses_the_model():
    client_node.adapted_model.cache_clear()
    decoded = [sketch_from_record(client_app.sketch_content(request(), context(1))) for _ in range(2)]
    expected_client = load_clients(CONFIG.data, load_tokenizer(CONFIG.model))[1]
    assert decoded[0].client_id == expected_client.client_id
    model = attach_lora(load_base_model(CONFIG.model), CONFIG.adapter)
    projector = JLProjector(gradient_dim(model), 16, seed=0)
    expected = sketch_client(model, expected_client, projector, decoded[0].metadata, 16, 1024)
    for sketch in decoded:
        np.testing.assert_allclose(sketch.features, expected.features, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(sketch.sample_index, expected.sample_index)
    assert client_node.adapted_model.cache_info().misses == 1  # the base model was loaded once


@pytest.mark.e2e
def test_malformed_sketch_replies_are_named():
    meta = SketchMetadata("tiny-random", "fp32", 4, "q_proj,v_proj", 0, "rademacher", 0, 4, 10, "lm")
    rows = {
        "split": np.zeros(3, dtype=np.int8),
        "sample_index": np.arange(3, dtype=np.int32),
        "outputs": np.ones(3, dtype=np.float32),
        "features": np.ones((3, 4), dtype=np.float32),
        "labels": -np.ones(3, dtype=np.int32),
    }
    from elora_fed.sketch.client_sketch import ClientSketch

    good = ClientSketch("a:A", metadata=meta, **rows)
    assert sketch_from_record(sketch_to_record(good)).client_id == "a:A"
    with pytest.raises(DataError, match="malformed sketch reply"):
        sketch_from_record(RecordDict())
    nan = ClientSketch("a:A", metadata=meta, **{**rows, "features": np.full((3, 4), np.nan, dtype=np.float32)})
    with pytest.raises(DataError, match="non-finite"):
        sketch_from_record(sketch_to_record(nan))
    wrong_d = ClientSketch("a:A", metadata=dataclasses.replace(meta, dim=5), **rows)
    with pytest.raises(DataError, match="d = 5"):
        sketch_from_record(sketch_to_record(wrong_d))


def test_train_returns_an_update_of_the_same_adapter_with_its_sample_count():
    start = theta_star()
    options = ConfigRecord({"local-steps": 3, "lr": 0.05, "batch-size": 4, "seed": "0:train:1", "objective": "fit"})
    reply = client_app.train_content(request(arrays=adapter_record(start), config=options), context(2))
    update = adapter_from(reply.array_records["arrays"], start)
    metrics = reply.metric_records["metrics"]
    client = load_clients(CONFIG.data, load_tokenizer(CONFIG.model))[2]
    assert update.keys() == start.keys() and metrics["num-examples"] == len(client.splits["train"])
    assert any(not torch.equal(update[k], start[k]) for k in start) and np.isfinite(metrics["train-loss"])
    again = client_app.train_content(request(arrays=adapter_record(start), config=options), context(2))
    torch.testing.assert_close(adapter_from(again.array_records["arrays"], start), update)  # seeded


def test_evaluate_learns_simplex_weights_or_uses_the_given_ones():
    start = theta_star()
    moved = {k: v + 0.2 * torch.randn_like(v) for k, v in start.items()}
    groups = {0: GroupAdapters(start), 1: GroupAdapters(moved)}
    fit = ConfigRecord({"split": "validation", "groups": ["0", "1"], "fit-weights": True})
    learned = client_app.evaluate_content(request(config=fit, **ensemble_records(groups)), context(0))
    weights = learned.metric_records["metrics"]["weights"]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)
    one_hot = ConfigRecord({"split": "validation", "groups": ["0", "1"], "weights": [1.0, 0.0]})
    alone = client_app.evaluate_content(request(config=one_hot, **ensemble_records(groups)), context(0))
    only = ConfigRecord({"split": "validation", "groups": ["0"], "weights": [1.0]})
    single = client_app.evaluate_content(request(config=only, **ensemble_records({0: groups[0]})), context(0))
    assert alone.metric_records["metrics"]["loss"] == pytest.approx(single.metric_records["metrics"]["loss"])
    assert learned.metric_records["metrics"]["loss"] <= alone.metric_records["metrics"]["loss"] + 1e-4


def test_the_fine_tuning_curve_point_at_t_steps_is_the_loss_after_a_t_step_fine_tuning():
    groups = {0: GroupAdapters(theta_star())}

    def evaluate(steps: int, curve: bool):
        options = {"split": "validation", "groups": ["0"], "weights": [1.0], "finetune-steps": steps}
        reply = client_app.evaluate_content(
            request(config=ConfigRecord({**options, "finetune-curve": curve}), **ensemble_records(groups)), context(1)
        )
        return reply.metric_records["metrics"]

    metrics = evaluate(3, curve=True)
    curve = metrics["finetune-curve"]
    assert len(curve) == 4 and curve[3] == pytest.approx(metrics["loss"], rel=1e-5)
    assert curve[0] != curve[3]
    for t in (0, 2):  # 0 steps: the shared adapter as it is
        assert curve[t] == pytest.approx(evaluate(t, curve=False)["loss"], rel=1e-5)
    assert "finetune-curve" not in evaluate(2, curve=False)


def test_boost_query_sends_residuals_and_asked_for_ridge_statistics_of_the_sketch_rows():
    start = theta_star()
    ask = ConfigRecord({"ridge-statistics": True})
    reply = client_app.boost_content(request(options=ask, **ensemble_records({0: GroupAdapters(start)})), context(1))
    boost = {k: v.numpy() for k, v in reply.array_records["boost"].items()}
    sketch = sketch_from_record(client_app.sketch_content(request(), context(1)))
    outputs, features = sketch.rows("train")
    expected = 1 / (1 + np.exp(outputs))  # r = 1 - sigmoid(b) at theta*
    np.testing.assert_allclose(boost["residuals"], expected, rtol=1e-4)
    gram, moment = ridge_statistics(features, expected)
    np.testing.assert_allclose(boost["gram"], gram, rtol=1e-3, atol=1e-6 * np.abs(gram).max())
    np.testing.assert_allclose(boost["moment"], moment, rtol=1e-3, atol=1e-6 * np.abs(moment).max())
    plain = client_app.boost_content(request(**ensemble_records({0: GroupAdapters(start)})), context(1))
    assert set(plain.array_records["boost"]) == {"sample_index", "residuals"}  # no feature leaves by default


def test_protocol_decoding_names_what_is_wrong():
    state = {"x.lora_A.default.weight": torch.ones(2, 2)}
    decoded = ensemble_from(RecordDict(ensemble_records({3: GroupAdapters(state, [state, state])})), state)
    assert list(decoded) == [3] and len(decoded[3].boosts) == 2
    with pytest.raises(DataError, match="without their base adapter"):
        ensemble_from(RecordDict({"group.1.boost.0": adapter_record(state)}), state)
    with pytest.raises(DataError, match=r"group.0.base.*\(3,\) torch.float32, expected \(4,\) floats"):
        ensemble_from(RecordDict({"group.0.base": adapter_record({"x": torch.ones(3)})}), state)
    with pytest.raises(DataError, match="expected one array 'adapter'"):
        ensemble_from(RecordDict({"group.0.base": ArrayRecord(state)}), state)
    with pytest.raises(DataError, match="without a readable run config"):
        run_config(RecordDict())
    assert run_config(request()) == CONFIG
    with pytest.raises(DataError, match="'lr' .* is not a number"):
        client_app.train_content(
            request(
                arrays=adapter_record(theta_star()),
                config=ConfigRecord({"local-steps": 1, "lr": "fast", "batch-size": 2}),
            ),
            context(0),
        )
