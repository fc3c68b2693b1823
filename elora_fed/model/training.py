"""Real fine-tuning of the adapter: the loop the surrogate estimates, and local client training.

Objectives, all on the scalar output h (``elora_fed.model.log_odds``):
- ``sample_log_loss``: log(1 + exp(-h)) of each sample's mean h, the loss the sketch-space
  surrogate minimizes (used to measure the surrogate against real runs);
- ``target_log_loss``: log(1 + exp(-h)) of every target, i.e. the cross-entropy of every
  next token; what group adapters train on and what the pipeline reports;
- ``boost_objective``: least squares of a boosting adapter's change of h against residuals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from elora_fed.model.batches import Batch
from elora_fed.model.gradient_guard import check_gradients


def log_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sample log(1 + exp(-h)) for one batch, differentiable."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.nn.functional.softplus(-batch.outputs(logits))


Objective = Callable[[nn.Module, int, Batch], torch.Tensor]
"""(model, batch index, batch on the model's device) -> the scalar loss of that batch."""


def sample_log_loss(model: nn.Module, index: int, batch: Batch) -> torch.Tensor:
    return log_loss(model, batch).mean()


def target_log_loss(model: nn.Module, index: int, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    h, mask = batch.position_outputs(logits)
    return torch.nn.functional.softplus(-h[mask]).mean()


def boost_objective(targets: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> Objective:
    """Mean (r - (h - b))^2 per batch: fit the change of each sample's h from its base value b to r."""

    def objective(model: nn.Module, index: int, batch: Batch) -> torch.Tensor:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        change = batch.outputs(logits) - base[index].to(logits.device)
        return ((targets[index].to(logits.device) - change) ** 2).mean()

    return objective


def train_adapter(
    model: nn.Module,
    batches: Sequence[Batch],
    steps: int,
    lr: float,
    seed: int = 0,
    objective: Objective = sample_log_loss,
    proximal_mu: float = 0.0,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """``steps`` Adam steps on the trainable parameters, one batch per step in a seeded order.

    ``proximal_mu > 0`` adds FedProx's (mu / 2) |x - x_0|^2 towards the starting weights.
    ``after_step(t)`` runs after step t (1-based), so one run can be measured at several
    lengths: the first t steps of a longer run are exactly a t-step run with the same seed.
    Returns the training loss (without the proximal term) of every step. Raises
    ZeroGradientError at a step whose gradients are all exactly zero at a finite loss.
    """
    if not batches:
        raise ValueError("train_adapter needs at least one batch")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = torch.optim.Adam(params, lr=lr)
    rng = np.random.RandomState(seed)
    order = np.concatenate([rng.permutation(len(batches)) for _ in range(-(-steps // len(batches)))])
    losses: list[float] = []
    model.train()
    for step in range(steps):
        index = int(order[step])
        loss = objective(model, index, batches[index].to(device))
        total = loss
        if anchor:
            total = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        optimizer.zero_grad()
        total.backward()
        check_gradients(model, loss, (p.grad for p in params), f"training step {step}")
        optimizer.step()
        losses.append(float(loss.detach()))
        if after_step is not None:
            after_step(step + 1)
            model.train()
    model.eval()
    return losses


@torch.no_grad()
def evaluate_log_loss(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """Per-sample log(1 + exp(-h)) over ``batches``, in order."""
    device = next(model.parameters()).device
    return torch.cat([log_loss(model, b.to(device)).cpu() for b in batches])
