from __future__ import annotations

import numpy as np
import pytest

from elora_fed.seeds import derive_seed


def test_derived_seeds_are_reproducible_sized_and_tell_their_parts_apart():
    assert derive_seed(0, "train", 1, 2) == derive_seed(0, "train", 1, 2)
    assert derive_seed(0, "train", 1, 2) != derive_seed(0, "train", 2, 1)
    assert all(0 <= derive_seed(7, "x", i, bits=bits) < 2**bits for i in range(50) for bits in (1, 32, 64, 128))
    with pytest.raises(ValueError, match="bits"):
        derive_seed(0, bits=0)


def test_seeds_of_keys_one_character_apart_are_uncorrelated():
    """What crc32 got wrong: it is affine, so round r and round r + 1 drew related seeds."""
    first = np.array([derive_seed(0, "train", c, 1, bits=64) / 2**64 for c in range(4000)])
    second = np.array([derive_seed(0, "train", c, 2, bits=64) / 2**64 for c in range(4000)])
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.05
    assert abs(np.mean((first < 0.5) & (second < 0.5)) - 0.25) < 0.03
