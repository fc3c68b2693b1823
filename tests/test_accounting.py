"""Cost accounting: token counting at the model, FLOPs from counts, parameter counts in 4 bits."""

import numpy as np
import pytest

from elora_fed.accounting import ModelSize, TokenCounter, base_parameter_count
from elora_fed.config import RunConfig
from elora_fed.errors import ConfigError
from elora_fed.model.adapters import attach_lora
from elora_fed.model.batches import lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import load_base_model
from elora_fed.model.training import target_log_loss, train_adapter
from strategies.baselines import OneGroup, OneGroupPerClient, RandomGroups


def test_counter_sees_every_forward_and_backward_position():
    model = attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig(rank=4))
    counter = TokenCounter().attach(model)
    batches = [lm_batch(np.random.RandomState(i).randint(100, 500, size=(3, 10))) for i in range(2)]
    with counter.measure() as usage:
        train_adapter(model, batches, steps=4, lr=1e-3, objective=target_log_loss)
    assert usage.forward_tokens == 4 * 30 and usage.backward_tokens == 4 * 30
    with counter.measure() as evaluation:
        model(input_ids=batches[0].input_ids)
    assert evaluation.forward_tokens == 30 and evaluation.backward_tokens == 0
    assert evaluation.peak_rss_bytes > 100 * 2**20


def test_flops_and_four_bit_parameter_counts():
    size = ModelSize(base_params=1000, adapter_params=10, gradient_dim=5, sketch_dim=4)
    assert size.flops(3, 2, 7) == {"forward": 6000.0, "backward": 4040.0, "sketch": 280.0}
    fp32 = load_base_model(ModelConfig(name="tiny-random"))
    nf4 = load_base_model(ModelConfig(name="tiny-random", precision="nf4"))
    assert base_parameter_count(nf4) == base_parameter_count(fp32) == sum(p.numel() for p in fp32.parameters())


def test_baseline_groupings():
    ids = [f"p:{i}" for i in range(10)]
    config = RunConfig.from_flat({"clustering.num_groups": 3, "seed": 4})
    assert OneGroup(config).group(None, ids).tolist() == [0] * 10
    assert OneGroupPerClient(config).group(None, ids).tolist() == list(range(10))
    labels = RandomGroups(config).group(None, ids)
    assert sorted(np.bincount(labels).tolist()) == [3, 3, 4]
    assert labels.tolist() == RandomGroups(config).group(None, ids).tolist()  # seeded
    with pytest.raises(ConfigError, match="num_groups"):
        RandomGroups(RunConfig())


def test_message_bytes_count_the_records_that_flowers_own_count_rejects():
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from strategies.messaging import records_bytes

    arrays = ArrayRecord({"x": Array(np.zeros(4, dtype=np.float32))})
    counted = records_bytes(RecordDict({"a": arrays}))
    assert counted == arrays.count_bytes() > 16
    # Flower 1.42 raises on an empty string (ValueError) and an empty list (IndexError): counted per item instead
    odd = ConfigRecord({"status": "", "empty": [], "n": 3, "s": ["ab", "c"]})
    assert records_bytes(RecordDict({"a": arrays, "c": odd})) == counted + len("status") + len("empty") + 1 + 8 + 1 + 3
