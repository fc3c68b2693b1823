"""The config section of the affinity estimate: ``affinity.*``.

Torch-free: the ClientApp reads its config before it imports the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from elora_fed.section import Section, check_choice, check_dotted_path, check_range

AFFINITY_MODES = ("exact", "private", "secure", "gradient-cosine")
"""The built-in ``affinity.mode``s (``elora_fed.surrogate.affinity_modes.BUILT_IN``)."""


@dataclass(frozen=True)
class AffinityConfig(Section):
    """Task affinity from the sketches (``elora_fed.surrogate.affinity``).

    ``mode`` is ``exact`` (surrogate fine-tuning on the clients' features), ``private``
    (only additive per-client statistics), ``secure`` (the private mode through secure
    aggregation: the server sees only sums over subsets, ``secagg``),
    ``gradient-cosine`` (the baseline), or a user's mode class, ``module:Class`` or
    ``path/file.py:Class`` (``elora_fed.surrogate.affinity_modes``: what clients release, and the
    estimate from it). ``lam`` is the surrogate's L2 strength, calibrated
    against real fine-tuning (``experiments/estimation_error.py`` reports its choice).
    ``num_subsets`` random subsets of ``subset_size`` clients are solved, plus greedy ones
    until every pair of clients shares a subset. ``offsets = "remove"`` subtracts each
    client's main effect (what it gains from every partner alike, ``affinity.remove_offsets``)
    before clustering, so groups follow which partners help which.
    """

    mode: str = "exact"
    lam: float = 0.3
    subset_size: int = 5
    num_subsets: int = 200
    seed: int = 0
    offsets: str = "keep"

    def validate(self) -> None:
        if ":" in self.mode:  # a user's mode class (``elora_fed.surrogate.affinity_modes``)
            check_dotted_path("affinity.mode", self.mode)
        else:
            check_choice("affinity.mode", self.mode, AFFINITY_MODES)
        check_choice("affinity.offsets", self.offsets, ("keep", "remove"))
        check_range("affinity.lam", self.lam, low=0.0, inclusive_low=False)
        check_range("affinity.subset_size", self.subset_size, low=2)
        check_range("affinity.num_subsets", self.num_subsets, low=0)
