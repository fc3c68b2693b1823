"""First-order outputs at the server: any adapter's h on a sketched sample, with no model pass.

A sample's sketch holds b = h(theta*) and g~ = P^T g, g = dh/dB at theta*. For an adapter
theta near theta*, to first order

    h(theta) ~ b + g . (B - B*) ~ b + g~ . P^T (B - B*),

since a JL projection keeps inner products (docs/METHOD.md, section 2), and only B enters: at
theta* (B* = 0) the gradient with respect to A is zero. A group's output
h_0 + eta * sum_t (h_t - h*) is then b + g~ . (v_0 + eta * sum_t v_t), with v = P^T (B - B*)
for each of its adapters. These are estimates of each sample's mean h over its targets,
the same h that sketches and boosting use; how far they are from real evaluation is
measured by ``experiments/first_order_evaluation.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from elora_fed.ensemble.outputs import AdapterState, GroupAdapters
from elora_fed.sketch.projection import JLProjector


def sketch_direction(theta_star: AdapterState, state: AdapterState, projector: JLProjector) -> np.ndarray:
    """v = P^T (B - B*): an adapter's change of the lora_B coordinates, in sketch space (d,)."""
    b_names = [name for name in theta_star if ".lora_B." in name]
    delta = torch.cat([(state[n].float() - theta_star[n].float()).reshape(-1) for n in b_names])
    if delta.numel() != projector.input_dim:
        raise ValueError(
            f"the adapter has {delta.numel()} lora_B coordinates, the projector expects {projector.input_dim}"
        )
    return projector.project(delta[None]).double().numpy()[0]


def group_direction(group: GroupAdapters, theta_star: AdapterState, projector: JLProjector, eta: float) -> np.ndarray:
    """v_0 + eta * sum_t v_t: a group's output change from theta*, in sketch space."""
    direction = sketch_direction(theta_star, group.base, projector)
    for boost in group.boosts:
        direction = direction + eta * sketch_direction(theta_star, boost, projector)
    return direction


def first_order_outputs(outputs: np.ndarray, features: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """b + G~ v: the estimated h (n,) of sketched samples (b (n,), G~ (n, d)) under direction v."""
    return np.asarray(outputs, dtype=np.float64) + np.asarray(features, dtype=np.float64) @ direction
