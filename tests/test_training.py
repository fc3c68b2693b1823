import numpy as np
import torch

from elora_fed.model.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.model.batches import lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import load_base_model
from elora_fed.model.training import evaluate_log_loss, train_adapter


def test_training_lowers_the_log_loss_and_theta_star_can_be_restored():
    model = attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig(rank=4))
    rng = np.random.RandomState(0)
    batches = [lm_batch(rng.randint(100, 140, size=(4, 12))) for _ in range(3)]  # a tiny vocabulary: learnable
    theta_star = adapter_state(model)
    before = evaluate_log_loss(model, batches)
    losses = train_adapter(model, batches, steps=30, lr=3e-2, seed=0)
    after = evaluate_log_loss(model, batches)
    assert len(losses) == 30 and after.mean() < before.mean() - 0.3
    load_adapter_state(model, theta_star)
    torch.testing.assert_close(evaluate_log_loss(model, batches), before)
    again = train_adapter(model, batches, steps=30, lr=3e-2, seed=0)
    assert np.allclose(again, losses, rtol=1e-4)  # the same seed, the same run


def test_fedprox_term_keeps_local_training_near_its_start_and_boost_objective_fits_residuals():
    from elora_fed.ensemble.outputs import adapter_outputs
    from elora_fed.model.training import boost_objective, target_log_loss

    model = attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig(rank=4))
    rng = np.random.RandomState(0)
    batches = [lm_batch(rng.randint(100, 140, size=(4, 12))) for _ in range(3)]
    theta_star = adapter_state(model)

    def drift(mu: float) -> float:
        load_adapter_state(model, theta_star)
        train_adapter(model, batches, steps=20, lr=3e-2, objective=target_log_loss, proximal_mu=mu)
        return sum(float((adapter_state(model)[k] - v).norm() ** 2) for k, v in theta_star.items()) ** 0.5

    assert drift(100.0) < 0.5 * drift(0.0)
    load_adapter_state(model, theta_star)
    base = [adapter_outputs(model, [b], theta_star).per_sample() for b in batches]
    targets = [torch.full_like(b, 0.3) for b in base]
    objective = boost_objective(targets, base)
    before = float(objective(model, 0, batches[0]))
    train_adapter(model, batches, steps=30, lr=1e-2, objective=objective)
    assert float(objective(model, 0, batches[0])) < 0.2 * before  # h moved by about +0.3 everywhere
