"""The config sections of differential privacy and secure aggregation: ``privacy.*``, ``secagg.*``.

Torch-free: the ClientApp reads its config before it imports the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from elora_fed.errors import ConfigError
from elora_fed.section import Section, check_range


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """Optional differential privacy of the sketch phase (``elora_fed.privacy.mechanism``).

    ``noise_multiplier`` z > 0 makes every client clip its projected gradient rows to L2
    norm ``clip_norm`` C (and, in exact mode, its base outputs to [-``output_bound``,
    ``output_bound``]) and add Gaussian noise scaled by z to what it sends: its sketch
    (exact mode) or its gradient and curvature sums (private mode). 0 turns it off. The run
    reports the resulting (epsilon, ``delta``) per sample. The noise comes from the OS's
    entropy, so a server that knows the run seed cannot regenerate it; ``reproducible``
    seeds it by (run seed, client id) instead, for repeatable experiments only.
    """

    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    output_bound: float = 10.0
    delta: float = 1e-5
    reproducible: bool = False

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def validate(self) -> None:
        check_range("privacy.noise_multiplier", self.noise_multiplier, low=0.0)
        check_range("privacy.clip_norm", self.clip_norm, low=0.0, inclusive_low=False)
        check_range("privacy.output_bound", self.output_bound, low=0.0, inclusive_low=False)
        check_range("privacy.delta", self.delta, low=0.0, high=1.0, inclusive_low=False, inclusive_high=False)


@dataclass(frozen=True)
class SecAggConfig(Section):
    """Secure aggregation of the private-mode statistics (``affinity.mode = "secure"``).

    Every sampled subset's summed train statistics come from one round of Flower's SecAgg+
    among the subset's clients (``strategies.secure_statistics``), so the server sees sums,
    never one client's statistics. Each client quantizes its statistics to integers: values
    in [-``clipping_range``, ``clipping_range``] map to 0 .. ``quantization_range`` with
    stochastic rounding, so a sum over k clients is off by less than
    k * 2 clipping_range / quantization_range per entry; a client whose statistics exceed
    ``clipping_range`` refuses with an error naming this key instead of being clipped. The
    trade-off: a larger range admits larger clients (the sample count is one of the summed
    values) at a coarser step. Masked sums live modulo ``modulus_range`` (a power of two
    up to 2^32), which must exceed subset_size * quantization_range. Each client's secrets
    are split into shares for ``num_shares`` of the subset's clients (a fraction), of which
    ``reconstruction_threshold`` (a fraction) are needed to remove its masks.
    """

    clipping_range: float = 4096.0
    quantization_range: int = 2**26
    modulus_range: int = 2**32
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5

    def validate(self) -> None:
        check_range("secagg.clipping_range", self.clipping_range, low=0.0, inclusive_low=False)
        check_range("secagg.quantization_range", self.quantization_range, low=2, high=2**31 - 1)
        check_range("secagg.modulus_range", self.modulus_range, low=4, high=2**32)
        if self.modulus_range & (self.modulus_range - 1):
            raise ConfigError(f"config key 'secagg.modulus_range' = {self.modulus_range} is not a power of two")
        check_range("secagg.num_shares", self.num_shares, low=0.0, high=1.0, inclusive_low=False)
        check_range(
            "secagg.reconstruction_threshold", self.reconstruction_threshold, low=0.0, high=1.0, inclusive_low=False
        )

    def check_subset_size(self, size: int) -> None:
        """ConfigError unless sums over ``size`` clients fit below the modulus."""
        if size * self.quantization_range >= self.modulus_range:
            raise ConfigError(
                f"secure aggregation over subsets of {size} clients needs secagg.modulus_range = {self.modulus_range} "
                f"> subset size x secagg.quantization_range = {size * self.quantization_range}: lower "
                "secagg.quantization_range or affinity.subset_size"
            )
