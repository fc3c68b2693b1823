"""The ClientApp's sketch reply built from a real Flower Context, and the sketch wire format."""

import dataclasses

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from clients import app as client_app
from clients.protocol import sketch_from_record, sketch_to_record
from elora_fed.adapters import attach_lora
from elora_fed.client_sketch import SketchMetadata, sketch_client
from elora_fed.config import RunConfig
from elora_fed.errors import DataError
from elora_fed.federated_data import load_clients
from elora_fed.models import load_base_model, load_tokenizer
from elora_fed.projection import JLProjector
from elora_fed.sketch import gradient_dim

CONFIG = RunConfig.from_flat(
    {"model.name": "tiny-random", "data.num_clients": 3, "data.max_samples_per_client": 12, "sketch.dim": 16}
)


def context(partition: int) -> Context:
    node_config = {"partition-id": partition, "num-partitions": 3}
    return Context(
        run_id=1, node_id=10 + partition, node_config=node_config, state=RecordDict(), run_config=CONFIG.to_flat()
    )


def test_sketch_query_replies_with_this_clients_sketch_and_reuses_the_model():
    client_app._adapted_model.cache_clear()
    decoded = [sketch_from_record(client_app.sketch_content(context(1))) for _ in range(2)]
    expected_client = load_clients(CONFIG.data, load_tokenizer(CONFIG.model))[1]
    assert decoded[0].client_id == expected_client.client_id
    model = attach_lora(load_base_model(CONFIG.model), CONFIG.adapter)
    projector = JLProjector(gradient_dim(model), 16, seed=0)
    expected = sketch_client(model, expected_client, projector, decoded[0].metadata, 16, 1024)
    for sketch in decoded:
        np.testing.assert_allclose(sketch.features, expected.features, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(sketch.sample_index, expected.sample_index)
    assert client_app._adapted_model.cache_info().misses == 1  # the base model was loaded once


def test_malformed_sketch_replies_are_named():
    meta = SketchMetadata("tiny-random", "fp32", 4, "q_proj,v_proj", 0, "rademacher", 0, 4, 10, "lm")
    rows = {
        "split": np.zeros(3, dtype=np.int8),
        "sample_index": np.arange(3, dtype=np.int32),
        "outputs": np.ones(3, dtype=np.float32),
        "features": np.ones((3, 4), dtype=np.float32),
        "labels": -np.ones(3, dtype=np.int32),
    }
    from elora_fed.client_sketch import ClientSketch

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
