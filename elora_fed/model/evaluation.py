"""Evaluating a (possibly adapted) causal LM on next-token samples."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedModel


@torch.no_grad()
def mean_token_loss(model: PreTrainedModel, tokens: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every target position of ``tokens`` (n, L)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = torch.as_tensor(np.asarray(tokens[start : start + batch_size]), dtype=torch.long, device=device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += targets.numel()
    return total / count
