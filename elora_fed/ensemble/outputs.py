"""The ensemble's outputs: group outputs with boosting, their weighted combination, and metrics.

Every prediction is the scalar log-odds h of a target (``elora_fed.model.log_odds``). A group's
output is its FedAvg adapter's h plus ``eta`` times each boosting adapter's *change* of h
from theta* (h_t - h*): a boosting adapter is fit to residuals as such a change, so the
same scalar it was fit to is what gets added (docs/METHOD.md's scale trap). A client's
prediction is a weighted sum of the groups' outputs, with weights on the simplex learned
on its validation split (``elora_fed.ensemble.weights``).

Metrics, the same for single adapters and ensembles: the loss of a target is
log(1 + exp(-h)) (for one model, exactly the cross-entropy -log p_y of that target).
Accuracy is top-1: the target is correct when its h is the largest of all candidates'
(every vocabulary token for next-token targets, the label words for classification),
with each candidate's h combined exactly as the target's is (``evaluate_ensemble``). For
one model that is the usual argmax of the logits, since h is increasing in p.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from elora_fed.model.adapters import AdapterState, load_adapter_state
from elora_fed.model.batches import Batch


@dataclass(frozen=True)
class GroupAdapters:
    """One group's adapters: the FedAvg adapter and the boosting adapters added to it."""

    base: AdapterState
    boosts: list[AdapterState] = field(default_factory=list)


@dataclass(frozen=True)
class Outputs:
    """h at every target (n, P) of a split's samples, and which targets are real (n, P)."""

    h: torch.Tensor
    mask: torch.Tensor
    top1: torch.Tensor | None = None  # (n, P) bool: the target has the largest h of all candidates

    def per_sample(self) -> torch.Tensor:
        """Each sample's mean h over its real targets: the h that sketches and boosting use."""
        mask = self.mask.to(self.h.dtype)
        return (self.h * mask).sum(1) / mask.sum(1)

    def loss(self) -> float:
        return float(torch.nn.functional.softplus(-self.h[self.mask]).mean())

    def accuracy(self) -> float:
        """Top-1 accuracy over the real targets (needs ``top1``: outputs from ``evaluate_ensemble``)."""
        if self.top1 is None:
            raise ValueError("these outputs carry no top-1 record: compute them with evaluate_ensemble")
        return float(self.top1[self.mask].float().mean())

    @property
    def num_targets(self) -> int:
        return int(self.mask.sum())


@torch.no_grad()
def adapter_outputs(model: nn.Module, batches: Sequence[Batch], state: AdapterState) -> Outputs:
    """h at every target of ``batches`` with the adapter set to ``state``."""
    load_adapter_state(model, state)
    device = next(model.parameters()).device
    hs, masks = [], []
    for batch in batches:
        b = batch.to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        h, mask = b.position_outputs(logits)
        hs.append(h.float().cpu())
        masks.append(mask.cpu())
    width = max(h.shape[1] for h in hs)
    return Outputs(
        torch.cat([torch.nn.functional.pad(h, (0, width - h.shape[1])) for h in hs]),
        torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]),
    )


@dataclass(frozen=True)
class Evaluation:
    """One pass over a split: each group's outputs, their weighted combination, and theta*'s."""

    groups: list[Outputs]
    combined: Outputs | None  # given weights
    base: Outputs | None  # with_base


@torch.no_grad()
def evaluate_ensemble(
    model: nn.Module,
    batches: Sequence[Batch],
    groups: Sequence[GroupAdapters],
    theta_star: AdapterState,
    eta: float,
    weights: np.ndarray | None = None,
    with_base: bool = False,
) -> Evaluation:
    """Every group's output h_0 + eta * sum_t (h_t - h*), combined with ``weights``, with top-1 records.

    Top-1 needs every candidate's h combined before the argmax (the maximum of a weighted
    sum is not the weighted sum of maxima), so each batch's per-candidate h of every
    adapter is summed with the group's coefficients and the weights, then compared with
    the target's. One forward per adapter and batch.
    """
    if weights is not None and len(weights) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(weights)} weights")
    device = next(model.parameters()).device
    per_group: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in groups]
    combined: list[tuple[torch.Tensor, torch.Tensor]] = []
    base: list[tuple[torch.Tensor, torch.Tensor]] = []
    masks = []
    for batch in batches:
        b = batch.to(device)
        targets, mask = b.candidate_targets()
        masks.append(mask.cpu())
        star = adapter_candidates(model, b, theta_star) if with_base or any(g.boosts for g in groups) else None
        if with_base:
            assert star is not None
            base.append(_target_and_top1(star, targets))
        total = None
        for i, h in enumerate(group_candidates(model, b, groups, theta_star, eta, star)):
            per_group[i].append(_target_and_top1(h, targets))
            if weights is not None:
                total = float(weights[i]) * h if total is None else total + float(weights[i]) * h
        if total is not None:
            combined.append(_target_and_top1(total, targets))
    return Evaluation(
        [_stack(rows, masks) for rows in per_group],
        _stack(combined, masks) if weights is not None else None,
        _stack(base, masks) if with_base else None,
    )


def adapter_candidates(model: nn.Module, batch: Batch, state: AdapterState) -> torch.Tensor:
    """h of every candidate at every target of ``batch`` (n, P, K; on the model's device) under ``state``."""
    load_adapter_state(model, state)
    return batch.candidate_outputs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)


def group_candidates(
    model: nn.Module,
    batch: Batch,
    groups: Sequence[GroupAdapters],
    theta_star: AdapterState,
    eta: float,
    star: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Each group's h_0 + eta * sum_t (h_t - h*) of every candidate (n, P, K), one group at a time.

    A generator, so that only one group's (n, P, vocabulary) tensor is held at once.
    ``star`` is theta*'s ``adapter_candidates`` on ``batch`` when the caller has it already.
    """
    for group in groups:
        h = adapter_candidates(model, batch, group.base)
        if group.boosts and star is None:
            star = adapter_candidates(model, batch, theta_star)
        for boost in group.boosts:
            assert star is not None
            h += eta * (adapter_candidates(model, batch, boost) - star)
        yield h


def group_outputs(
    model: nn.Module, batches: Sequence[Batch], group: GroupAdapters, theta_star: AdapterState, eta: float
) -> Outputs:
    """A group's output h_0 + eta * sum_t (h_t - h*) at every target of ``batches``."""
    return evaluate_ensemble(model, batches, [group], theta_star, eta).groups[0]


def _target_and_top1(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From h of every candidate (n, P, K): the target's h (n, P), and whether it is the largest."""
    target_h = h.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rival = h.scatter(-1, targets.unsqueeze(-1), float("-inf")).amax(-1)
    return target_h.cpu(), (target_h > rival).cpu()


def _stack(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], masks: Sequence[torch.Tensor]) -> Outputs:
    width = max(m.shape[1] for m in masks)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    return Outputs(
        torch.cat([pad(h) for h, _ in rows]),
        torch.cat([pad(m) for m in masks]),
        torch.cat([pad(c) for _, c in rows]),
    )


def combine(outputs: Sequence[Outputs], weights: np.ndarray) -> Outputs:
    """The weighted sum of the groups' outputs (all over the same samples)."""
    if len(outputs) != len(weights):
        raise ValueError(f"{len(outputs)} group outputs but {len(weights)} weights")
    h = sum((float(w) * o.h for w, o in zip(weights, outputs, strict=True)), torch.zeros_like(outputs[0].h))
    return Outputs(h, outputs[0].mask)
