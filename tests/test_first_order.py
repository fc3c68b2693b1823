"""First-order outputs from sketches against real evaluation of a moved adapter."""

import numpy as np

from elora_fed.ensemble.outputs import GroupAdapters, adapter_outputs
from elora_fed.model.adapters import adapter_state, attach_lora
from elora_fed.model.batches import lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import load_base_model
from elora_fed.sketch.first_order import first_order_outputs, group_direction, sketch_direction
from elora_fed.sketch.gradients import gradient_dim, per_sample_gradients, sketch_batches
from elora_fed.sketch.projection import JLProjector


def test_first_order_outputs_track_the_real_change_of_h_for_a_small_step():
    model = attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig())
    theta_star = adapter_state(model)
    batches = [lm_batch(np.random.RandomState(0).randint(0, 49000, size=(6, 16)))]
    projector = JLProjector(gradient_dim(model), 2048, seed=0)
    sketch = sketch_batches(model, batches, projector)
    b, features = sketch.outputs.double().numpy(), sketch.features.double().numpy()
    # Move B a small step along the samples' mean gradient (first order: the change is g . step).
    _, grads = per_sample_gradients(model, batches[0])
    step = 0.05 * grads.mean(0) / grads.mean(0).norm()
    moved, offset = dict(theta_star), 0
    for name in (n for n in theta_star if ".lora_B." in n):
        size = theta_star[name].numel()
        moved[name] = theta_star[name] + step[offset : offset + size].reshape(theta_star[name].shape)
        offset += size
    real = adapter_outputs(model, batches, moved).per_sample().double().numpy()
    estimate = first_order_outputs(b, features, sketch_direction(theta_star, moved, projector))
    change = real - b
    assert np.abs(change).max() > 1e-3  # the step moved h
    # 5% from the curvature at this step, a few % from the projection at d = 2048
    assert np.linalg.norm(estimate - real) / np.linalg.norm(change) < 0.15
    assert np.allclose(sketch_direction(theta_star, theta_star, projector), 0.0)


def test_a_group_direction_adds_eta_times_each_boosting_adapter():
    model = attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig())
    theta_star = adapter_state(model)
    projector = JLProjector(gradient_dim(model), 16, seed=0)
    shifted = {k: v + 0.01 if ".lora_B." in k else v for k, v in theta_star.items()}
    base, boost = sketch_direction(theta_star, shifted, projector), 2 * sketch_direction(theta_star, shifted, projector)
    boosted = {k: v + 0.02 if ".lora_B." in k else v for k, v in theta_star.items()}
    got = group_direction(GroupAdapters(shifted, [boosted]), theta_star, projector, eta=0.1)
    np.testing.assert_allclose(got, base + 0.1 * boost, rtol=1e-5, atol=1e-8)
