import numpy as np
import torch

from elora_fed.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.batches import lm_batch
from elora_fed.config import AdapterConfig, ModelConfig
from elora_fed.models import load_base_model
from elora_fed.training import evaluate_log_loss, train_adapter


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
