"""The config section of the clustering: ``clustering.*``.

Torch-free: the ClientApp reads its config before it imports the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from elora_fed.errors import ConfigError
from elora_fed.section import Section, check_choice, check_range


@dataclass(frozen=True)
class ClusteringConfig(Section):
    """Grouping clients by affinity (``elora_fed.grouping.clustering``).

    ``method``: ``fast`` (low-rank Burer-Monteiro relaxation), ``sdp`` (cvxpy, with
    ``solver`` SCS or CLARABEL) or ``spectral`` (the baseline). ``num_groups = 0`` chooses
    m automatically by excess density: the average within-cluster density above what random
    groups of the same sizes score (``elora_fed.grouping.clustering.choose_num_groups``; not with
    ``spectral``).
    """

    method: str = "fast"
    num_groups: int = 0
    solver: str = "SCS"

    def validate(self) -> None:
        check_choice("clustering.method", self.method, ("fast", "sdp", "spectral"))
        check_choice("clustering.solver", self.solver, ("SCS", "CLARABEL"))
        check_range("clustering.num_groups", self.num_groups, low=0)
        if self.method == "spectral" and self.num_groups == 0:
            raise ConfigError("clustering.method = 'spectral' needs clustering.num_groups > 0")
