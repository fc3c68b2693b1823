"""One way to derive a seed from a run's seed and the names of a choice: sha256 of the parts.

Every seeded choice (a training round's client sample, a client's batch order, its local
fine-tuning, its dropout draw, its privacy noise) takes its seed from ``derive_seed(run
seed, what, who, ...)``, so choices are reproducible, independent of the order they are
made in (resume replays none of them), and uncorrelated: crc32, which the toolkit used
before, is affine, so keys that differ in one character (round 1 and round 2) gave
correlated draws.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object, bits: int = 32) -> int:
    """An integer of ``bits`` bits (at most 256) from the sha256 of the parts, joined by ':'."""
    if not 1 <= bits <= 256:
        raise ValueError(f"bits must be between 1 and 256, got {bits}")
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest, "big") >> (256 - bits)
