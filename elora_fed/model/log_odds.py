"""The scalar output h: the log-odds of the correct target, computed stably.

    h = z_y - logsumexp_{j != y} z_j   ( = log p_y - log(1 - p_y) )

With this h the binary log loss log(1 + exp(-h)) equals the cross-entropy -log p_y of a
single target. The correct logit is masked out of the logsumexp instead of computing
log(1 - p_y), so nothing needs clamping, even when p_y rounds to 1.
"""

from __future__ import annotations

import torch


def log_odds(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """h over the last dimension of ``logits`` (..., K) for integer ``target`` (...)."""
    logits = logits.float()
    index = target.unsqueeze(-1)
    correct = logits.gather(-1, index).squeeze(-1)
    others = logits.scatter(-1, index, float("-inf")).logsumexp(-1)
    return correct - others


def all_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """h of every candidate over the last dimension (..., K), as if each were the target.

    log(1 - p_k) is computed from log p_k, accurately for every k but the most likely one
    (only it can have p near 1); that one is recomputed with ``log_odds``'s masking, so
    every entry matches ``log_odds`` for that target.
    """
    logits = logits.float()
    log_p = logits.log_softmax(-1)
    log_not_p = torch.where(log_p > -0.6931, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))
    h = log_p - log_not_p
    top = logits.argmax(-1)
    return h.scatter(-1, top.unsqueeze(-1), log_odds(logits, top).unsqueeze(-1))


def lm_log_odds(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean of h over its target positions (next tokens that are not padding)."""
    per_position = log_odds(logits[:, :-1], input_ids[:, 1:])
    valid = attention_mask[:, 1:].to(per_position.dtype)
    return (per_position * valid).sum(1) / valid.sum(1)


def label_log_odds(
    logits: torch.Tensor, attention_mask: torch.Tensor, label_token_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per sample, h at the prompt's last real position, over the label words' tokens only."""
    last = attention_mask.sum(1) - 1
    rows = torch.arange(logits.shape[0], device=logits.device)
    return log_odds(logits[rows, last][:, label_token_ids], labels)
