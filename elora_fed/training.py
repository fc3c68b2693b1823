"""Real fine-tuning of the adapter: the loop the surrogate estimates, and local client training.

The objective is the method's own loss on the scalar output h: log(1 + exp(-h)) per sample
(``elora_fed.log_odds``), the same loss the sketch-space surrogate minimizes, so that real
runs and estimates measure the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from elora_fed.batches import Batch


def log_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sample log(1 + exp(-h)) for one batch, differentiable."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.nn.functional.softplus(-batch.outputs(logits))


def train_adapter(model: nn.Module, batches: Sequence[Batch], steps: int, lr: float, seed: int = 0) -> list[float]:
    """``steps`` Adam steps on the trainable parameters, one batch per step in a seeded order.

    Returns the training loss of every step.
    """
    if not batches:
        raise ValueError("train_adapter needs at least one batch")
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.RandomState(seed)
    order = np.concatenate([rng.permutation(len(batches)) for _ in range(-(-steps // len(batches)))])
    losses: list[float] = []
    model.train()
    for step in range(steps):
        loss = log_loss(model, batches[order[step]].to(device)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate_log_loss(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """Per-sample log(1 + exp(-h)) over ``batches``, in order."""
    device = next(model.parameters()).device
    return torch.cat([log_loss(model, b.to(device)).cpu() for b in batches])
