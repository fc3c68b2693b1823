"""The first-order boosting fit: residual targets, a ridge fit in sketch space, and its lift to an adapter.

A boosting adapter is fit to the residuals r = 1 - p of its group's ensemble as a change of
h from theta* (docs/METHOD.md, section 5.2): least squares on the sketch features, summed
over clients as additive statistics, then lifted back to the lora_B coordinates by P.
"""

from __future__ import annotations

import numpy as np
import torch

from elora_fed.model.adapters import AdapterState
from elora_fed.sketch.projection import JLProjector


def residual_targets(per_sample_h: torch.Tensor) -> torch.Tensor:
    """Boosting targets r = 1 - p, p = sigmoid(h): the probability mass still missing."""
    return 1.0 - torch.sigmoid(per_sample_h)


def ridge_statistics(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G^T G, G^T r): the additive statistics of a least-squares fit, summed over clients."""
    g = np.asarray(features, dtype=np.float64)
    return g.T @ g, g.T @ np.asarray(targets, dtype=np.float64)


def ridge_fit(gram: np.ndarray, moment: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_w |r - G w|^2 + ridge |w|^2 from G^T G and G^T r: the first-order boosting fit in sketch space."""
    return np.linalg.solve(gram + ridge * np.eye(len(moment)), moment)


def lift(theta_star: AdapterState, projector: JLProjector, w: np.ndarray) -> AdapterState:
    """theta* + P w: the adapter whose B matrices are the lifted sketch-space vector ``w``.

    The sketch's gradient coordinates are the lora_B tensors in module order, flattened
    (``elora_fed.sketch.gradients.gradient_parameters``); theta*'s tensors are in the same order.
    Only B changes: to first order the adapter acts through B alone.
    """
    b_names = [name for name in theta_star if ".lora_B." in name]
    sizes = [theta_star[name].numel() for name in b_names]
    if sum(sizes) != projector.input_dim:
        raise ValueError(f"theta* has {sum(sizes)} lora_B coordinates, the projector expects {projector.input_dim}")
    vector = projector.lift(torch.as_tensor(w, dtype=torch.float32))
    state = dict(theta_star)
    for name, chunk in zip(b_names, torch.split(vector, sizes), strict=True):
        state[name] = theta_star[name] + chunk.reshape(theta_star[name].shape).to(theta_star[name].dtype)
    return state
