import numpy as np
import pytest
import torch
from peft import IA3Config, get_peft_model

from elora_fed.errors import ConfigError
from elora_fed.model.adapters import attach_lora
from elora_fed.model.batches import Batch, classification_batch, lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import EMBEDDED_MODEL, load_base_model
from elora_fed.sketch.gradients import (
    gradient_dim,
    gradient_parameters,
    naive_per_sample_gradients,
    per_sample_gradients,
    sketch_batches,
)
from elora_fed.sketch.projection import JLProjector

ALL_LINEAR = AdapterConfig(rank=4, target_modules="all-linear")


def lora_model(name="tiny-random", precision="fp32", adapter=ALL_LINEAR):
    return attach_lora(load_base_model(ModelConfig(name=name, precision=precision)), adapter)


def padded_lm_batch() -> Batch:
    """Next-token samples of different lengths, right-padded."""
    rng = np.random.RandomState(0)
    lengths = [12, 7, 12, 4]
    ids = torch.full((4, 12), 2, dtype=torch.long)
    mask = torch.zeros((4, 12), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.as_tensor(rng.randint(10, 40000, size=n))
        mask[row, :n] = 1
    return Batch(ids, mask)


def padded_classification_batch() -> Batch:
    prompts = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13, 14, 15, 16, 17], [300]]
    return classification_batch(prompts, [0, 1, 2, 1], [100, 200, 300], pad_token_id=2)


BATCHES = {
    "lm": lambda: lm_batch(np.random.RandomState(1).randint(0, 49000, size=(5, 16))),
    "lm-padded": padded_lm_batch,
    "classification-padded": padded_classification_batch,
}


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_batched_gradients_equal_the_naive_loop(precision, kind):
    model, batch = lora_model(precision=precision), BATCHES[kind]()
    h, grads = per_sample_gradients(model, batch)
    h_ref, grads_ref = naive_per_sample_gradients(model, batch)
    assert grads.shape == (len(batch), gradient_dim(model)) and grads.abs().max() > 0
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads, grads_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(BATCHES))
def test_batched_gradients_under_bf16_autocast_stay_within_the_stated_tolerance_of_fp32(kind):
    """bf16 matmuls keep 8 significant bits: h within 0.05 and gradients within 3% (relative norm) of fp32."""
    model, batch = lora_model(), BATCHES[kind]()
    h_ref, grads_ref = naive_per_sample_gradients(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, grads = per_sample_gradients(model, batch)
    assert h.dtype == grads.dtype == torch.float32
    assert (h - h_ref).abs().max() < 0.05
    assert (grads - grads_ref).norm() / grads_ref.norm() < 0.03
    assert not torch.equal(grads, grads_ref)  # autocast did change the arithmetic


def test_padding_does_not_leak_into_other_samples():
    model, batch = lora_model(), padded_lm_batch()
    h, grads = per_sample_gradients(model, batch)
    for i in range(len(batch)):
        h_alone, g_alone = per_sample_gradients(model, batch.select(i))
        torch.testing.assert_close(h[i : i + 1], h_alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[i : i + 1], g_alone, rtol=1e-4, atol=1e-6)


def test_at_theta_star_lora_a_gets_zero_gradient_so_only_b_is_sketched():
    model = lora_model()
    batch = BATCHES["lm"]()
    h = batch.outputs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits).sum()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    grads = dict(zip(names, torch.autograd.grad(h, params), strict=True))
    assert all(not g.any() for n, g in grads.items() if "lora_A" in n)
    assert all(g.any() for n, g in grads.items() if "lora_B" in n)
    sketched = [name for name, _ in gradient_parameters(model)]
    assert sketched and all(".lora_B." in name for name in sketched)
    assert gradient_dim(model) == sum(p.numel() for n, p in zip(names, params, strict=True) if "lora_B" in n)


def ia3_model(precision="fp32"):
    base = load_base_model(ModelConfig(name="tiny-random", precision=precision))
    config = IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    return get_peft_model(base, config)


@pytest.mark.parametrize("kind", ["lm", "classification-padded"])
def test_other_tuners_take_the_generic_torch_func_path(kind):
    model, batch = ia3_model(), BATCHES[kind]()
    assert [n for n, _ in gradient_parameters(model)] == [n for n, p in model.named_parameters() if p.requires_grad]
    h, grads = per_sample_gradients(model, batch)
    h_ref, grads_ref = naive_per_sample_gradients(model, batch)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads, grads_ref, rtol=1e-4, atol=1e-7)


def test_generic_path_on_a_4bit_base_is_a_clear_error():
    with pytest.raises(ConfigError, match="need a dense base model"):
        per_sample_gradients(ia3_model("nf4"), BATCHES["lm"]())


def test_sketch_equals_projected_naive_gradients_whatever_the_buffer():
    model = lora_model()
    batches = [BATCHES["lm"](), padded_lm_batch(), BATCHES["lm"]()]
    projector = JLProjector(gradient_dim(model), 32, seed=5, block_rows=1000)
    reference = [naive_per_sample_gradients(model, b) for b in batches]
    expected_features = projector.project(torch.cat([g for _, g in reference]))
    for buffer_mb in (0.01, 1024):  # flushing after every batch, or once at the end
        sketch = sketch_batches(model, batches, projector, buffer_mb=buffer_mb)
        torch.testing.assert_close(sketch.outputs, torch.cat([h for h, _ in reference]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sketch.features, expected_features, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="the projector expects p = 7"):
        sketch_batches(model, batches, JLProjector(7, 4, seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lm-padded", "classification-padded"])
def test_smollm2_batched_gradients_equal_the_naive_loop(kind):
    model = lora_model(EMBEDDED_MODEL, adapter=AdapterConfig(rank=4, target_modules="q_proj,v_proj"))
    batch = BATCHES[kind]()
    h, grads = per_sample_gradients(model, batch)
    h_ref, grads_ref = naive_per_sample_gradients(model, batch)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    # 30 layers of float32 with and without padding masks: compare on the gradients' scale
    scale = float(grads_ref.abs().max())
    torch.testing.assert_close(grads, grads_ref, rtol=1e-3, atol=1e-4 * scale)
    assert torch.nn.functional.cosine_similarity(grads, grads_ref).min() > 0.99999
