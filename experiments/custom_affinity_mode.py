"""A worked example of a user's affinity mode: each client releases one vector, its mean gradient.

An affinity mode (``elora_fed/surrogate/affinity_modes.py``) owns both what a client sends in the
sketch phase and how the server turns the releases into an affinity. This one sends d
numbers per client, where exact mode sends d + 1 per sample: the client's mean train loss
gradient in sketch space. The server's affinity is the cosine of those vectors, which is
the gradient-cosine baseline's, computed from far less data (the test checks that the two
agree). Use it with

    elora-fed run --preset demo --set affinity.mode=experiments/custom_affinity_mode.py:MeanGradientMode

It adds no noise, so it refuses ``privacy``; and since its release is not the per-sample
rows, first-order boosting asks clients for their ridge statistics instead of reusing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from elora_fed.config import RunConfig
from elora_fed.data.splits import SPLITS
from elora_fed.errors import ConfigError
from elora_fed.privacy.mechanism import NoisedPart
from elora_fed.sketch.client_sketch import ClientSketch
from elora_fed.surrogate.affinity import cosine_affinity, mean_train_gradient
from elora_fed.surrogate.affinity_modes import sketches_only
from elora_fed.surrogate.quadratic_sums import SubsetSums
from elora_fed.surrogate.statistics import ClientStatistics
from elora_fed.surrogate.task_features import task_features


class MeanGradientMode:
    """Release the mean train gradient (one sketch row); affinity = cosine between clients' releases."""

    secure_aggregation: ClassVar[bool] = False
    per_sample_rows: ClassVar[bool] = False
    released: ClassVar[str] = "the mean projected train loss gradient (d numbers)"

    def __init__(self, config: RunConfig) -> None:
        if config.privacy.enabled:
            raise ConfigError("affinity.mode MeanGradientMode adds no noise: set privacy.noise_multiplier = 0")
        self.config = config

    def release(self, sketch: ClientSketch) -> ClientSketch:
        mean = mean_train_gradient(task_features(sketch)).numpy().astype(np.float32)
        return ClientSketch(
            client_id=sketch.client_id,
            split=np.array([SPLITS.index("train")]),
            sample_index=np.array([0]),
            outputs=np.zeros(1, dtype=np.float32),
            features=mean[None, :],
            labels=np.array([-1]),
            metadata=sketch.metadata,
        )

    def estimate(self, collected: Sequence[ClientSketch | ClientStatistics] | SubsetSums) -> np.ndarray:
        return cosine_affinity([torch.from_numpy(c.features[0]) for c in sketches_only(collected)])

    def privacy_parts(self) -> list[NoisedPart]:
        raise ConfigError("affinity.mode MeanGradientMode adds no noise, so it has no privacy guarantee")
