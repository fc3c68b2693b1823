"""The config section of the sketches: ``sketch.*``.

Torch-free: the ClientApp reads its config before it imports the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from elora_fed.section import Section, check_choice, check_range


@dataclass(frozen=True)
class SketchConfig(Section):
    """The projected-gradient features (``elora_fed.sketch.gradients``).

    ``dim`` is d, the sketch dimension; ``projection`` is ``rademacher`` (entries
    +-1/sqrt(d), bit-identical on every device) or ``gaussian`` (N(0, 1/d)); ``seed`` fixes
    P everywhere. ``buffer_mb`` bounds the per-sample gradients held before they are
    projected together; ``block_rows`` bounds one generated block of P.
    """

    dim: int = 400
    projection: str = "rademacher"
    seed: int = 0
    batch_size: int = 16
    buffer_mb: int = 1024
    block_rows: int = 4096

    def validate(self) -> None:
        check_range("sketch.dim", self.dim, low=1)
        check_choice("sketch.projection", self.projection, ("rademacher", "gaussian"))
        check_range("sketch.batch_size", self.batch_size, low=1)
        check_range("sketch.buffer_mb", self.buffer_mb, low=1)
        check_range("sketch.block_rows", self.block_rows, low=1)
