"""The baselines EnsembleLoRA is judged against, as groupings for the same pipeline (docs/METHOD.md section 6).

Each is a clustering class for ``strategies.clustering``; the rest of the pipeline (the same
clients, splits, training budget and evaluation) is unchanged, so results compare like
with like. Groupings that do not look at the affinity set ``needs_affinity = False`` and the
pipeline skips the sketch and affinity phases for them, so their cost is not counted.

- ``OneGroup``: one (Q)LoRA adapter trained by FedAvg on all clients. With
  ``train.finetune_steps > 0`` each client then fine-tunes it locally before the test:
  MTL-FT, with the number of local steps (0 to ``finetune_steps``) chosen on validation.
- ``OneGroupPerClient``: one adapter per client, trained on its own data only.
- ``RandomGroups``: ``clustering.num_groups`` random groups of near-equal size (seeded).
- Grouping by gradient cosine similarity is ``affinity.mode = "gradient-cosine"`` with the
  default clustering.

``method_settings`` names each method's config overrides, for experiments that compare them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from elora_fed.config import RunConfig
from elora_fed.errors import ConfigError

METHODS = (
    "ensemble",
    "ensemble-centered",
    "ensemble-keep-best",
    "ensemble-validated",
    "qlora",
    "mtl-ft",
    "cosine",
    "random",
    "local",
)


def method_settings(method: str, finetune_steps: int = 0, num_groups: int | None = None) -> dict[str, Any]:
    """The overrides that turn the default (EnsembleLoRA) run into ``method``.

    ``ensemble-centered``: EnsembleLoRA on the affinity without per-client offsets;
    ``ensemble-keep-best``: EnsembleLoRA where each group keeps its adapter of its lowest
    own-client validation loss over the rounds (a per-group early stop: small groups overfit);
    ``ensemble-validated``: EnsembleLoRA evaluated on validation every round, keeping the last
    round's adapters (``ensemble-keep-best``'s ablation: the same run but for the choice);
    ``qlora``: one adapter; ``mtl-ft``: it, fine-tuned ``finetune_steps`` locally; ``cosine``:
    gradient-cosine groups; ``random``: ``num_groups`` random groups (EnsembleLoRA's m, for a
    like-for-like comparison); ``local``: one adapter per client. Baselines with one adapter
    per group boost nothing (``boost.steps = 0``): boosting is part of EnsembleLoRA.
    """
    one = {"strategies.clustering": "strategies.baselines:OneGroup", "boost.steps": 0}
    table: dict[str, dict[str, Any]] = {
        "ensemble": {},
        "ensemble-centered": {"affinity.offsets": "remove"},
        "ensemble-keep-best": {"train.validation_every": 1, "train.keep_best": True},
        "ensemble-validated": {"train.validation_every": 1},
        "qlora": one,
        "mtl-ft": {**one, "train.finetune_steps": finetune_steps},
        "cosine": {"affinity.mode": "gradient-cosine"},
        "random": {"strategies.clustering": "strategies.baselines:RandomGroups", "clustering.num_groups": num_groups},
        "local": {"strategies.clustering": "strategies.baselines:OneGroupPerClient", "boost.steps": 0},
    }
    if method not in table:
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "random" and not num_groups:
        raise ConfigError("the random-groups baseline needs num_groups (EnsembleLoRA's m)")
    if method == "mtl-ft" and finetune_steps < 1:
        raise ConfigError("MTL-FT needs finetune_steps >= 1")
    return dict(table[method])


class OneGroup:
    """Every client in one group: the single shared adapter."""

    needs_affinity = False

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def group(self, affinity: np.ndarray | None, client_ids: Sequence[str]) -> np.ndarray:
        return np.zeros(len(client_ids), dtype=int)


class OneGroupPerClient:
    """Each client alone: local training only (FedAvg over one client is its local update).

    ``own_group_only``: a client's prediction is its own adapter, so the pipeline learns no
    weights over the other clients' adapters and does not evaluate them.
    """

    needs_affinity = False
    own_group_only = True

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def group(self, affinity: np.ndarray | None, client_ids: Sequence[str]) -> np.ndarray:
        return np.arange(len(client_ids))


class RandomGroups:
    """``clustering.num_groups`` groups drawn at random (seeded by ``seed``), sizes differing by at most one."""

    needs_affinity = False

    def __init__(self, config: RunConfig) -> None:
        if config.clustering.num_groups < 1:
            raise ConfigError("RandomGroups needs clustering.num_groups > 0 (the m to compare with)")
        self.m = config.clustering.num_groups
        self.seed = config.seed

    def group(self, affinity: np.ndarray | None, client_ids: Sequence[str]) -> np.ndarray:
        labels = np.arange(len(client_ids)) % min(self.m, len(client_ids))
        return np.random.default_rng(self.seed).permutation(labels)
