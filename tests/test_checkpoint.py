"""Checkpoints and adapters on disk: round trips, atomic replacement, peft compatibility."""

import pytest
import torch
from peft import PeftModel

from elora_fed.checkpoint import Checkpoint, Snapshot
from elora_fed.errors import DataError
from elora_fed.model.adapters import adapter_state, attach_lora, load_peft_adapter, save_peft_adapter
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import load_base_model


def test_snapshots_round_trip_and_only_the_latest_is_kept(tmp_path):
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.load() is None
    state = {"a.lora_B.default.weight": torch.arange(6.0).reshape(2, 3)}
    checkpoint.save(Snapshot(info={"done": ["sketch"]}, adapters={"group-0": state}, objects={"x": [1, 2]}))
    checkpoint.save(Snapshot(info={"done": ["sketch", "groups"]}, adapters={"group-0": state}, objects={}))
    loaded = checkpoint.load()
    assert loaded is not None and loaded.info == {"done": ["sketch", "groups"]}
    torch.testing.assert_close(loaded.adapters["group-0"], state)
    assert [p.name for p in (tmp_path / "checkpoint").glob("step-*")] == ["step-0002"]


def test_a_damaged_checkpoint_is_a_named_error(tmp_path):
    checkpoint = Checkpoint(tmp_path)
    checkpoint.save(Snapshot(info={}, adapters={"g": {"w": torch.ones(2)}}))
    next((tmp_path / "checkpoint").glob("step-*/g.safetensors")).write_bytes(b"garbage")
    with pytest.raises(DataError, match="checkpoint .* unreadable"):
        checkpoint.load()


def test_saved_adapters_load_in_peft_and_back(tmp_path):
    cfg = AdapterConfig(rank=4, seed=1)
    model = attach_lora(load_base_model(ModelConfig(name="tiny-random")), cfg)
    state = {k: v + 0.5 for k, v in adapter_state(model).items()}
    save_peft_adapter(state, cfg, "tiny-random", tmp_path / "adapter")
    assert load_peft_adapter(tmp_path / "adapter").keys() == state.keys()
    torch.testing.assert_close(load_peft_adapter(tmp_path / "adapter"), state)
    peft_model = PeftModel.from_pretrained(load_base_model(ModelConfig(name="tiny-random")), tmp_path / "adapter")
    params = dict(peft_model.named_parameters())
    for name, value in state.items():
        torch.testing.assert_close(params[name], value)
