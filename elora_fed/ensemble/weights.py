"""A client's group weights: simplex weights over the groups' outputs, learned on its validation split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from elora_fed.ensemble.outputs import Outputs


def fit_weights(outputs: Sequence[Outputs], steps: int = 200, lr: float = 0.1) -> np.ndarray:
    """Simplex weights over the groups that minimize the combined log loss (Adam on softmax logits).

    Starts from uniform weights; deterministic. With one group the answer is [1.0].
    """
    if len(outputs) == 1 or steps == 0:
        return np.full(len(outputs), 1.0 / len(outputs))
    mask = outputs[0].mask
    stacked = torch.stack([o.h[mask] for o in outputs]).double()  # (G, targets)
    logits = torch.zeros(len(outputs), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.softplus(-(torch.softmax(logits, 0) @ stacked)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.softmax(logits.detach(), 0).numpy()
