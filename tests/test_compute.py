"""The compute dtype: what ``auto`` resolves to, and that handlers run their passes in it."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from clients import handlers as client_app
from clients.protocol import run_record
from clients.records import sketch_from_record
from elora_fed.config import RunConfig
from elora_fed.ensemble.outputs import adapter_outputs
from elora_fed.model.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.model.batches import lm_batch
from elora_fed.model.compute import compute_context, native_bf16, resolve_compute_dtype
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import load_base_model
from elora_fed.model.training import target_log_loss, train_adapter


@pytest.mark.parametrize("precision", ["fp32", "bf16", "nf4"])
def test_explicit_compute_dtypes_are_kept_and_auto_changes_fp32_and_nf4_models(precision):
    for explicit in ("fp32", "bf16"):
        assert resolve_compute_dtype(ModelConfig(precision=precision, compute_dtype=explicit)) == explicit
    auto = resolve_compute_dtype(ModelConfig(precision=precision, device="cpu"))
    native = native_bf16(torch.device("cpu"))
    assert auto == ("bf16" if precision in ("fp32", "nf4") and native else "fp32")


def test_the_context_autocasts_matmuls_to_bf16_only_when_asked():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with compute_context(ModelConfig(compute_dtype="bf16", device="cpu")):
        assert (x @ w).dtype == torch.bfloat16
    with compute_context(ModelConfig(compute_dtype="fp32", device="cpu")):
        assert (x @ w).dtype == torch.float32


def test_the_sketch_handler_runs_in_the_configured_compute_dtype():
    base = RunConfig.from_flat(
        {"model.name": "tiny-random", "data.num_clients": 2, "data.max_samples_per_client": 12, "sketch.dim": 16}
    )
    context = Context(run_id=1, node_id=10, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    sketches = {}
    for dtype in ("fp32", "bf16"):
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, compute_dtype=dtype))
        reply = client_app.sketch_content(RecordDict({"run": run_record(config)}), context)
        sketches[dtype] = sketch_from_record(reply)
    f32, f16 = sketches["fp32"].features, sketches["bf16"].features
    assert not np.array_equal(f32, f16)
    assert np.linalg.norm(f16 - f32) / np.linalg.norm(f32) < 0.03
    np.testing.assert_allclose(sketches["bf16"].outputs, sketches["fp32"].outputs, atol=0.05)


def test_adapters_loaded_and_trained_inside_one_bf16_context_take_effect():
    """Autocast's cast cache would keep the first adapter's bf16 copy for the whole context."""
    model = attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig())
    theta_star = adapter_state(model)
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in theta_star.items()}
    batches = [lm_batch(np.random.RandomState(0).randint(0, 49000, size=(4, 16)))]
    losses = {}
    for dtype in ("fp32", "bf16"):
        with compute_context(ModelConfig(compute_dtype=dtype, device="cpu")):
            star, other = (adapter_outputs(model, batches, s).loss() for s in (theta_star, moved))
            load_adapter_state(model, theta_star)
            trained = train_adapter(model, batches, steps=8, lr=0.02, objective=target_log_loss)
        losses[dtype] = (star, other, trained)
    for dtype, (star, other, trained) in losses.items():
        assert star != other, dtype
        assert trained[-1] < trained[0] - 0.05, dtype
    np.testing.assert_allclose(losses["bf16"][2], losses["fp32"][2], atol=0.05)
