import dataclasses

import numpy as np
import pytest

from elora_fed.data.classification import load_classification_tasks, tokenize_task
from elora_fed.data.lm_samples import LMSamples
from elora_fed.errors import DataError
from elora_fed.model.adapters import attach_lora
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import load_base_model
from elora_fed.sketch.client_sketch import ClientSketch, SketchMetadata, load_sketches, sketch_client
from elora_fed.sketch.gradients import gradient_dim
from elora_fed.sketch.projection import JLProjector

from .test_classification import JSONL

META = SketchMetadata("tiny-random", "fp32", 4, "q_proj,v_proj", 0, "rademacher", 0, 16, 1792, "lm")


@pytest.fixture(scope="module")
def model():
    return attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig())


def lm_client(client_id="hamlet:HAMLET", seed=0):
    rng = np.random.RandomState(seed)
    splits = {
        s: rng.randint(0, 40000, size=(n, 10)).astype(np.int32)
        for s, n in [("train", 7), ("validation", 3), ("test", 2)]
    }
    return LMSamples(client_id, splits)


def test_rows_carry_their_split_and_index_and_match_per_split_sketches(model):
    projector = JLProjector(gradient_dim(model), 16, seed=0)
    full = sketch_client(model, lm_client(), projector, META, batch_size=3, buffer_mb=64)
    assert full.features.shape == (10, 16) and full.outputs.shape == (10,)
    assert full.split.tolist() == [0] * 7 + [1] * 3 and full.sample_index.tolist() == [*range(7), *range(3)]
    assert (full.labels == -1).all()
    alone = sketch_client(model, lm_client(), projector, META, batch_size=2, buffer_mb=0.001, splits=["validation"])
    b, features = full.rows("validation")
    np.testing.assert_allclose(b, alone.outputs, rtol=1e-5)
    np.testing.assert_allclose(features, alone.features, rtol=1e-4, atol=1e-6)


def test_classification_clients_keep_their_labels(model, tokenizer):
    task = next(t for t in load_classification_tasks(str(JSONL)) if t.name == "topic")
    samples = tokenize_task(task, tokenizer, max_len=48)
    projector = JLProjector(gradient_dim(model), 16, seed=0)
    sketch = sketch_client(
        model, samples, projector, dataclasses.replace(META, task="classification"), 4, 64, pad_token_id=2
    )
    assert sketch.labels[sketch.split == 0].tolist() == samples.splits["train"].labels
    assert np.isfinite(sketch.features).all()


def test_order_of_rows_and_files_never_matters(tmp_path, model):
    projector = JLProjector(gradient_dim(model), 16, seed=0)
    sketch = sketch_client(model, lm_client(), projector, META, batch_size=4, buffer_mb=64)
    shuffled_order = np.random.RandomState(3).permutation(len(sketch.outputs))
    shuffled = ClientSketch(
        sketch.client_id,
        sketch.split[shuffled_order],
        sketch.sample_index[shuffled_order],
        sketch.outputs[shuffled_order],
        sketch.features[shuffled_order],
        sketch.labels[shuffled_order],
        META,
    )
    np.testing.assert_array_equal(shuffled.features, sketch.features)  # rows come back in (split, index) order
    other = sketch_client(model, lm_client("aaa:FIRST", seed=1), projector, META, batch_size=4, buffer_mb=64)
    shuffled.save(tmp_path)
    path = other.save(tmp_path)
    path.rename(tmp_path / "zzz-listed-last.npz")  # file names do not decide the order
    loaded = load_sketches(tmp_path)
    assert [s.client_id for s in loaded] == ["aaa:FIRST", "hamlet:HAMLET"]
    np.testing.assert_array_equal(loaded[1].features, sketch.features)
    assert loaded[1].metadata == META


def test_mixed_settings_and_corrupt_files_are_refused(tmp_path, model):
    projector = JLProjector(gradient_dim(model), 16, seed=0)
    sketch_client(model, lm_client(), projector, META, 4, 64).save(tmp_path)
    sketch_client(model, lm_client("b:B"), projector, dataclasses.replace(META, projection_seed=1), 4, 64).save(
        tmp_path
    )
    with pytest.raises(DataError, match="made with different settings"):
        load_sketches(tmp_path)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="corrupt sketch file .*broken.npz"):
        ClientSketch.load(broken)
    with pytest.raises(DataError, match="no client sketches"):
        load_sketches(tmp_path / "empty")
