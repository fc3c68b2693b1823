"""A finished run's ensemble as a model: score text and generate for one client.

``load_ensemble(run_dir)`` loads the base model once (as the run's config names it), the
group and boosting adapters from ``adapters/``, and each client's group weights from
``ensemble_weights.json``. A client's prediction is the run's own: at every target, the
weighted sum over groups g of h_g = h_{g,0} + eta * sum_t (h_{g,t} - h*), the log-odds of
``elora_fed.ensemble.outputs``. Its probability of a candidate k is sigma(h_k), what the run's
test loss scores (softplus(-h) = -log sigma(h)).

For one adapter sigma(h_k) is the softmax probability p_k, and summed over the vocabulary
it is 1. For an ensemble a sum of log-odds is no longer a distribution, so ``generate``
samples from sigma(h_k) renormalised over the vocabulary: q_k proportional to
sigma(h_k) ** (1 / temperature); temperature 0 takes the argmax of h. For one adapter
this is exactly softmax sampling at that temperature.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from elora_fed.config import RunConfig
from elora_fed.ensemble.outputs import AdapterState, GroupAdapters, Outputs, evaluate_ensemble, group_candidates
from elora_fed.errors import DataError
from elora_fed.model.adapters import adapter_state, attach_lora, load_peft_adapter
from elora_fed.model.batches import Batch, lm_batch
from elora_fed.model.compute import compute_context
from elora_fed.model.models import load_base_model, load_tokenizer
from elora_fed.run_dir import adapter_dir, boost_adapter_dirs


@dataclass(frozen=True)
class TokenScores:
    """One text scored by a client's ensemble: each next token and its log sigma(h)."""

    tokens: list[int]  # the text's tokens after the first (the first has no prediction)
    log_probs: list[float]

    @property
    def loss(self) -> float:
        """Mean -log sigma(h) over the tokens: the run's test loss on these targets."""
        return float(-np.mean(self.log_probs))


@dataclass
class RunEnsemble:
    """The base model with every adapter of a run, and each client's group weights."""

    config: RunConfig
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    theta_star: AdapterState
    groups: dict[int, GroupAdapters]
    weights: dict[str, list[float]]

    @property
    def clients(self) -> list[str]:
        return sorted(self.weights)

    def outputs(self, client_id: str, batches: Sequence[Batch]) -> Outputs:
        """The client's combined outputs on ``batches``, as the run's test phase computes them."""
        groups, weights = self._of(client_id)
        with torch.no_grad(), compute_context(self.config.model):
            combined = evaluate_ensemble(
                self.model, batches, groups, self.theta_star, self.config.boost.eta, weights
            ).combined
        assert combined is not None
        return combined

    def score(self, client_id: str, texts: Sequence[str]) -> list[TokenScores]:
        """Per-token log-probabilities log sigma(h) of each text under the client's ensemble."""
        if self.config.data.source == "classification":
            raise DataError("this run's clients are classification tasks: score them with outputs() on their batches")
        return self.score_ids(client_id, [self._encode(text) for text in texts])

    def score_ids(self, client_id: str, rows: Sequence[Sequence[int]]) -> list[TokenScores]:
        """``score`` on token ids (a client's own samples, say); rows of one length share a batch."""
        self._of(client_id)  # an unknown client is named before any row is looked at
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(rows):
            if len(ids) < 2:
                raise DataError(f"cannot score {len(ids)} token(s): scoring needs at least 2")
            by_length.setdefault(len(ids), []).append(i)
        scores: dict[int, TokenScores] = {}
        for indices in by_length.values():
            h = self.outputs(client_id, [lm_batch(np.asarray([rows[i] for i in indices]))]).h
            for i, row_h in zip(indices, h, strict=True):
                log_probs = (-torch.nn.functional.softplus(-row_h)).tolist()
                scores[i] = TokenScores([int(t) for t in rows[i][1:]], log_probs)
        return [scores[i] for i in range(len(rows))]

    def next_token_log_odds(self, client_id: str, ids: Sequence[int]) -> torch.Tensor:
        """The client's combined h of every vocabulary token as the next token after ``ids`` (V,)."""
        groups, weights = self._of(client_id)
        # Candidates are scored at positions 0..T-2 of a batch; a placeholder last token puts
        # the prompt's last position among them, and a causal model never looks at it.
        batch = lm_batch(np.asarray([[*ids, 0]])).to(next(self.model.parameters()).device)
        total = None
        with torch.no_grad(), compute_context(self.config.model):
            outputs = group_candidates(self.model, batch, groups, self.theta_star, self.config.boost.eta)
            for w, h in zip(weights, outputs, strict=True):
                total = float(w) * h[0, -1] if total is None else total + float(w) * h[0, -1]
        assert total is not None
        return total.float().cpu()

    def generate(
        self, client_id: str, prompt: str, max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0
    ) -> str:
        """Continue ``prompt`` for the client: sampling q_k ~ sigma(h_k) ** (1 / temperature) (module docstring).

        Every new token runs each adapter over the whole sequence (no key-value cache):
        meant for short continuations.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        ids = self._encode(prompt)
        if not ids:
            raise DataError("cannot generate from an empty prompt")
        generator = torch.Generator().manual_seed(seed)
        new: list[int] = []
        for _ in range(max_new_tokens):
            h = self.next_token_log_odds(client_id, [*ids, *new])
            if temperature == 0:
                token = int(h.argmax())
            else:
                log_q = torch.nn.functional.logsigmoid(h) / temperature
                token = int(torch.multinomial(torch.softmax(log_q, -1), 1, generator=generator))
            if token == self.tokenizer.eos_token_id:
                break
            new.append(token)
        return str(self.tokenizer.decode(new))

    def _of(self, client_id: str) -> tuple[list[GroupAdapters], np.ndarray]:
        if client_id not in self.weights:
            shown = ", ".join(self.clients[:5]) + (", ..." if len(self.clients) > 5 else "")
            raise DataError(f"client {client_id!r} is not in this run ({len(self.clients)} clients: {shown})")
        return [self.groups[g] for g in sorted(self.groups)], np.asarray(self.weights[client_id])

    def _encode(self, text: str) -> list[int]:
        """Tokens as the run's samples were made: no special tokens (``elora_fed.data.lm_samples``)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_ensemble(run_dir: Path | str) -> RunEnsemble:
    """A finished run's ensemble, from its directory (``config.json``, ``adapters/``, ``ensemble_weights.json``)."""
    run_dir = Path(run_dir)
    for name in ("config.json", "ensemble_weights.json", "adapters"):
        if not (run_dir / name).exists():
            raise DataError(f"{run_dir} is not a finished run directory: it has no {name}")
    config = RunConfig.from_flat(json.loads((run_dir / "config.json").read_text()))
    if config.train.finetune_steps:
        raise DataError(
            f"{run_dir} is an MTL-FT run: its clients fine-tune locally at test time, and those adapters are not saved"
        )
    saved = json.loads((run_dir / "ensemble_weights.json").read_text())
    boosts = boost_adapter_dirs(run_dir)
    groups = {
        int(g): GroupAdapters(
            load_peft_adapter(adapter_dir(run_dir, int(g))),
            [load_peft_adapter(p) for p in boosts.get(int(g), [])],
        )
        for g in saved["groups"]
    }
    model = attach_lora(load_base_model(config.model), config.adapter)
    model.eval()
    return RunEnsemble(config, model, load_tokenizer(config.model), adapter_state(model), groups, saved["weights"])
