"""Model-ready batches of samples, and how the scalar output h is read from their logits.

Two kinds of task share one engine:
- language modelling (Shakespeare): every sample has the same length; the targets are the
  next tokens, and h is averaged over target positions;
- classification: prompts of different lengths, right-padded; the answer is read at each
  prompt's last real position, over the label words' tokens only.

Right padding keeps every real token at the position it has unpadded, and the causal mask
keeps real tokens from attending to padding, so padding never changes another sample's h.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elora_fed.data.classification import ClassificationSamples
from elora_fed.data.lm_samples import LMSamples
from elora_fed.model.log_odds import all_log_odds, label_log_odds, lm_log_odds, log_odds


@dataclass(frozen=True)
class Batch:
    """Token ids (n, T), their attention mask, and for classification the label data."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None  # (n,) label indices, classification only
    label_token_ids: torch.Tensor | None = None  # (K,) one token per label word

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), move(self.labels), move(self.label_token_ids)
        )

    def select(self, index: int) -> Batch:
        """Sample ``index`` alone, without its padding (what a naive per-sample loop sees)."""
        length = int(self.attention_mask[index].sum())
        return Batch(
            self.input_ids[index : index + 1, :length],
            self.attention_mask[index : index + 1, :length],
            None if self.labels is None else self.labels[index : index + 1],
            self.label_token_ids,
        )

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """h for every sample of the batch, from the model's logits (n, T, V)."""
        if self.labels is None:
            return lm_log_odds(logits, self.input_ids, self.attention_mask)
        assert self.label_token_ids is not None
        return label_log_odds(logits, self.attention_mask, self.label_token_ids, self.labels)

    def position_outputs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h at every target of every sample, (n, P), and the mask (n, P) of real targets.

        Language modelling: P = T - 1 next-token targets (``outputs`` is their masked mean).
        Classification: P = 1, the answer.
        """
        if self.labels is None:
            return log_odds(logits[:, :-1], self.input_ids[:, 1:]), self.attention_mask[:, 1:].bool()
        h = self.outputs(logits).unsqueeze(1)
        return h, torch.ones_like(h, dtype=torch.bool)

    def candidate_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The index of each target among its candidates (n, P), and the mask of real targets.

        Language modelling: candidates are the vocabulary, targets the next tokens.
        Classification: candidates are the label words, the target is the label.
        """
        if self.labels is None:
            return self.input_ids[:, 1:], self.attention_mask[:, 1:].bool()
        return self.labels.unsqueeze(1), torch.ones((len(self), 1), dtype=torch.bool, device=self.labels.device)

    def candidate_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """h of every candidate at every target (n, P, K): gathered at ``candidate_targets``, ``position_outputs``'s h."""
        if self.labels is None:
            return all_log_odds(logits[:, :-1])
        assert self.label_token_ids is not None
        last = self.attention_mask.sum(1) - 1
        rows = torch.arange(logits.shape[0], device=logits.device)
        return all_log_odds(logits[rows, last][:, self.label_token_ids]).unsqueeze(1)


def lm_batch(tokens: np.ndarray) -> Batch:
    """Equal-length next-token samples (n, T)."""
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)  # a copy: cached samples are read-only maps
    return Batch(ids, torch.ones_like(ids))


def classification_batch(
    prompts: Sequence[Sequence[int]], labels: Sequence[int], label_token_ids: Sequence[int], pad_token_id: int
) -> Batch:
    """Right-padded prompts with their label indices."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.as_tensor(list(prompt))
        mask[row, : len(prompt)] = 1
    return Batch(ids, mask, torch.as_tensor(list(labels)), torch.as_tensor(list(label_token_ids)))


def client_batches(
    samples: LMSamples | ClassificationSamples, split: str, batch_size: int, pad_token_id: int
) -> Iterator[tuple[int, Batch]]:
    """One split of a client in order, as (index of the first sample, batch) pairs."""
    if isinstance(samples, LMSamples):
        tokens = samples.splits[split]
        for start in range(0, len(tokens), batch_size):
            yield start, lm_batch(tokens[start : start + batch_size])
        return
    prompts = samples.splits[split]
    for start in range(0, len(prompts.input_ids), batch_size):
        stop = start + batch_size
        batch = classification_batch(
            prompts.input_ids[start:stop], prompts.labels[start:stop], samples.label_token_ids, pad_token_id
        )
        yield start, batch
