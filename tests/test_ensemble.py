"""The ensemble's arithmetic on a real (tiny) adapted model: lifting, group outputs, weights, metrics."""

import numpy as np
import pytest
import torch

from elora_fed.ensemble.boosting import lift, residual_targets, ridge_fit, ridge_statistics
from elora_fed.ensemble.outputs import (
    GroupAdapters,
    Outputs,
    adapter_outputs,
    combine,
    evaluate_ensemble,
    group_outputs,
)
from elora_fed.ensemble.weights import fit_weights
from elora_fed.model.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.model.batches import lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.evaluation import mean_token_loss
from elora_fed.model.models import load_base_model
from elora_fed.sketch.gradients import gradient_dim, sketch_batches
from elora_fed.sketch.projection import JLProjector


@pytest.fixture(scope="module")
def model():
    return attach_lora(load_base_model(ModelConfig(name="tiny-random")), AdapterConfig(rank=4, seed=3))


@pytest.fixture(scope="module")
def batches():
    rng = np.random.RandomState(0)
    return [lm_batch(rng.randint(100, 5000, size=(4, 10))) for _ in range(2)]


def test_lifted_adapter_changes_outputs_as_the_sketch_predicts(model, batches):
    """theta* + P w moves each sample's h by g~ . w to first order: the lift and the sketch agree on P and layout."""
    theta_star = adapter_state(model)
    projector = JLProjector(gradient_dim(model), 64, seed=5)
    load_adapter_state(model, theta_star)
    sketch = sketch_batches(model, batches, projector)
    w = np.random.RandomState(1).randn(64) * 1e-3
    lifted = lift(theta_star, projector, w)
    assert all(torch.equal(lifted[k], theta_star[k]) for k in theta_star if ".lora_A." in k)  # only B moves
    real = (
        adapter_outputs(model, batches, lifted).per_sample() - adapter_outputs(model, batches, theta_star).per_sample()
    )
    predicted = sketch.features.double() @ torch.as_tensor(w)
    assert real.abs().max() > 1e-4  # the change is measurable
    torch.testing.assert_close(real.double(), predicted, rtol=0.05, atol=0.02 * float(predicted.abs().max()))


def test_single_adapter_loss_is_the_token_cross_entropy(model, batches):
    theta_star = adapter_state(model)
    out = adapter_outputs(model, batches, theta_star)
    tokens = np.concatenate([b.input_ids.numpy() for b in batches])
    assert out.loss() == pytest.approx(mean_token_loss(model, tokens), rel=1e-5)
    assert out.num_targets == tokens.shape[0] * (tokens.shape[1] - 1)


def test_group_output_adds_eta_times_each_boost_change(model, batches):
    theta_star = adapter_state(model)
    gen = torch.Generator().manual_seed(0)
    shifted = [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in theta_star.items()} for _ in range(3)]
    h = [adapter_outputs(model, batches, s).h for s in [theta_star, *shifted]]
    out = group_outputs(model, batches, GroupAdapters(shifted[0], shifted[1:]), theta_star, eta=0.1)
    # all_log_odds (every candidate's h) against log_odds (the target's): equal to rounding
    torch.testing.assert_close(out.h, h[1] + 0.1 * (h[2] - h[0]) + 0.1 * (h[3] - h[0]), rtol=1e-4, atol=1e-4)
    alone = group_outputs(model, batches, GroupAdapters(shifted[0]), theta_star, eta=0.1)
    torch.testing.assert_close(alone.h, h[1], rtol=1e-4, atol=1e-4)


def test_weights_favour_the_better_group_and_combine_on_the_simplex():
    mask = torch.ones(50, 3, dtype=torch.bool)
    good = Outputs(torch.full((50, 3), 2.0), mask)
    bad = Outputs(torch.full((50, 3), -2.0), mask)
    weights = fit_weights([bad, good], steps=200, lr=0.1)
    assert weights.sum() == pytest.approx(1.0) and weights[1] > 0.9
    combined = combine([bad, good], weights)
    assert combined.loss() < bad.loss()
    with pytest.raises(ValueError, match="top-1"):
        combined.accuracy()  # h alone says nothing about the other candidates
    assert fit_weights([good]).tolist() == [1.0]


def test_residuals_and_ridge_fit():
    assert residual_targets(torch.tensor([0.0, 100.0])).tolist() == pytest.approx([0.5, 0.0])
    rng = np.random.RandomState(0)
    g, w = rng.randn(200, 5), rng.randn(5)
    halves = [ridge_statistics(g[:80], g[:80] @ w), ridge_statistics(g[80:], g[80:] @ w)]
    gram, moment = (sum(parts) for parts in zip(*halves, strict=True))  # additive over clients
    np.testing.assert_allclose(ridge_fit(gram, moment, ridge=1e-8), w, rtol=1e-5)
    assert np.linalg.norm(ridge_fit(gram, moment, ridge=1e4)) < 0.1 * np.linalg.norm(w)  # ridge shrinks


def test_one_pass_evaluation_matches_each_adapters_outputs_and_brute_force_top1(model, batches):
    theta_star = adapter_state(model)
    gen = torch.Generator().manual_seed(1)
    shifted = [{k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in theta_star.items()} for _ in range(3)]
    groups = [GroupAdapters(shifted[0], [shifted[1]]), GroupAdapters(shifted[2])]
    weights = np.array([0.3, 0.7])
    result = evaluate_ensemble(model, batches, groups, theta_star, 0.5, weights, with_base=True)
    star_h = adapter_outputs(model, batches, theta_star).h
    for group, out in zip(groups, result.groups, strict=True):
        expected = adapter_outputs(model, batches, group.base).h
        for boost in group.boosts:
            expected = expected + 0.5 * (adapter_outputs(model, batches, boost).h - star_h)
        torch.testing.assert_close(out.h, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.combined.h, combine(result.groups, weights).h)

    def candidate_h(state):
        load_adapter_state(model, state)
        return torch.cat([b.candidate_outputs(model(input_ids=b.input_ids).logits) for b in batches])

    star, *h = (candidate_h(s) for s in [theta_star, *shifted])
    targets = torch.cat([b.input_ids[:, 1:] for b in batches])
    total = 0.3 * (h[0] + 0.5 * (h[1] - star)) + 0.7 * h[2]
    assert torch.equal(result.combined.top1, total.argmax(-1) == targets)
    assert torch.equal(result.groups[1].top1, h[2].argmax(-1) == targets)
    load_adapter_state(model, theta_star)
    logits = torch.cat([model(input_ids=b.input_ids).logits[:, :-1] for b in batches])
    assert torch.equal(result.base.top1, logits.argmax(-1) == targets)  # one model: the usual top-1
    assert result.base.loss() == pytest.approx(adapter_outputs(model, batches, theta_star).loss(), rel=1e-5)
