"""A seeded Johnson-Lindenstrauss projector that never holds its matrix.

P is a p x d matrix with i.i.d. entries, +-1/sqrt(d) (Rademacher) or N(0, 1/d) (Gaussian).
For a 1B-parameter model at LoRA rank 16, P would take tens of GB, so it is never stored:
every entry is a pure function of (seed, row, column), computed by a counter-based hash
in integer tensor ops on whatever device the gradients live on. A block of rows is
generated, used and dropped, so memory is bounded by ``block_rows * d`` whatever p is.

Because an entry depends only on (seed, row, column), not on the block size, the device or
the process, every client and the server get the same P from the seed alone. Rademacher
entries are bit-identical everywhere; Gaussian entries go through log and cos and can differ
across devices in the last bits of a float.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from elora_fed.model.compute import full_precision

PROJECTIONS = ("rademacher", "gaussian")
_MASK32 = 0xFFFFFFFF
_SIGN_BIT = -(2**31)  # int32 with only the sign bit set


def _magnitude_bits(d: int) -> int:
    """The int32 bit pattern of the float32 1/sqrt(d)."""
    return int(torch.tensor(1 / math.sqrt(d), dtype=torch.float32).view(torch.int32).item())


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values.

    Products of two 32-bit values may wrap in int64; only their low 32 bits are kept,
    which wrapping leaves exact.
    """
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _hash(seed: int, stream: int, counters: torch.Tensor) -> torch.Tensor:
    """32 uniform bits per 64-bit counter, for a (seed, stream) pair; an int64 tensor."""
    key = _fmix32(torch.tensor((seed * 0x9E3779B1 + stream * 0x7F4A7C15) & _MASK32, device=counters.device))
    high = _fmix32((counters >> 32) ^ key)
    return _fmix32((counters & _MASK32) ^ high)


@dataclass(frozen=True)
class JLProjector:
    """Projects rows of p-dimensional vectors to d dimensions: ``project(G) = G @ P``.

    ``block_rows`` bounds the memory of one generated block of P (``block_rows * d``
    floats); it does not change the result.
    """

    input_dim: int
    output_dim: int
    seed: int
    kind: str = "rademacher"
    block_rows: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in PROJECTIONS:
            raise ValueError(f"projection kind {self.kind!r} is not one of {', '.join(PROJECTIONS)}")
        if self.input_dim < 1 or self.output_dim < 1 or self.block_rows < 1:
            raise ValueError("input_dim, output_dim and block_rows must be positive")

    def block(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``start:stop`` of P, shape (stop - start, d), float32, generated on ``device``."""
        d = self.output_dim
        if self.kind == "rademacher":
            # One 32-bit hash gives the signs of 32 consecutive entries: bit k (0: +, 1: -)
            # is shifted into the float sign bit of an int32 holding the bits of 1/sqrt(d).
            first, last = start * d, stop * d
            words = torch.arange(first // 32, (last + 31) // 32, device=device, dtype=torch.int64)
            shifts = torch.arange(31, -1, -1, device=device, dtype=torch.int32)
            bits = _hash(self.seed, 0, words).to(torch.int32).unsqueeze(1) << shifts
            bits.bitwise_and_(_SIGN_BIT).bitwise_or_(_magnitude_bits(d))
            flat = bits.view(torch.float32).reshape(-1)
            return flat[first % 32 : first % 32 + last - first].reshape(stop - start, d)
        counters = torch.arange(start * d, stop * d, device=device, dtype=torch.int64)
        # Box-Muller on two independent uniform streams in (0, 1].
        u1 = (_hash(self.seed, 1, counters).to(torch.float64) + 1.0) / 2.0**32
        u2 = _hash(self.seed, 2, counters).to(torch.float64) / 2.0**32
        normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return (normal / math.sqrt(d)).to(torch.float32).reshape(stop - start, d)

    @full_precision
    def project(self, vectors: torch.Tensor | Sequence[torch.Tensor], row_offset: int = 0) -> torch.Tensor:
        """``vectors @ P[row_offset : row_offset + k]`` for ``vectors`` of shape (n, k), in float32.

        ``vectors`` may be a list of (n_i, k) chunks: each block of P is generated once for
        all of them, and the result is their projections stacked, without concatenating
        the inputs first. ``row_offset`` lets a caller project the gradient of one
        parameter tensor at a time: the full projection is the sum over tensors at their
        offsets in the flattened parameter vector.
        """
        chunks = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
        k = chunks[0].shape[1]
        if row_offset + k > self.input_dim:
            raise ValueError(f"rows {row_offset}:{row_offset + k} exceed the projector's input_dim {self.input_dim}")
        device = chunks[0].device
        outs = [torch.zeros(len(c), self.output_dim, dtype=torch.float32, device=device) for c in chunks]
        for start in range(0, k, self.block_rows):
            stop = min(k, start + self.block_rows)
            block = self.block(row_offset + start, row_offset + stop, device)
            for chunk, out in zip(chunks, outs, strict=True):
                out += chunk[:, start:stop].to(torch.float32) @ block
        return torch.cat(outs)

    @full_precision
    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """``P @ w`` for a d-vector ``w``: the p-dimensional vector a sketch-space solution stands for."""
        if w.shape != (self.output_dim,):
            raise ValueError(f"w has shape {tuple(w.shape)}, the projector's d is {self.output_dim}")
        w = w.to(torch.float32)
        parts = [
            self.block(start, min(self.input_dim, start + self.block_rows), w.device) @ w
            for start in range(0, self.input_dim, self.block_rows)
        ]
        return torch.cat(parts)
