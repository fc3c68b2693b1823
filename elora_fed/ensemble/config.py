"""The config sections of boosting and the ensemble weights: ``boost.*``, ``ensemble.*``.

Torch-free: the ClientApp reads its config before it imports the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from elora_fed.section import Section, check_choice, check_range


@dataclass(frozen=True)
class BoostConfig(Section):
    """Boosting after group training (docs/METHOD.md, section 5.2).

    Up to ``steps`` times, the group with the highest training loss gets a new adapter fit by
    least squares to the residuals r = 1 - p of its current ensemble, as a change of the
    output from theta*. ``variant`` ``first-order`` fits it in sketch space (ridge ``ridge``)
    and lifts it with P; ``trained`` trains it federatedly for ``rounds`` rounds. The
    group's output becomes h_0 + ``eta`` * sum of the changes. Boosting stops early when the
    group's training loss no longer drops.
    """

    steps: int = 1
    variant: str = "first-order"
    eta: float = 0.1
    ridge: float = 1.0
    rounds: int = 2

    def validate(self) -> None:
        check_range("boost.steps", self.steps, low=0)
        check_choice("boost.variant", self.variant, ("first-order", "trained"))
        check_range("boost.eta", self.eta, low=0.0, inclusive_low=False)
        check_range("boost.ridge", self.ridge, low=0.0, inclusive_low=False)
        check_range("boost.rounds", self.rounds, low=1)


@dataclass(frozen=True)
class EnsembleConfig(Section):
    """The weights that combine the groups' outputs for each client, learned on its validation split."""

    weight_steps: int = 200
    weight_lr: float = 0.1

    def validate(self) -> None:
        check_range("ensemble.weight_steps", self.weight_steps, low=0)
        check_range("ensemble.weight_lr", self.weight_lr, low=0.0, inclusive_low=False)
