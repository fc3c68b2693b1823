"""Cost accounting: FLOPs counted from tokens and parameters, peak memory, bytes on the wire.

FLOPs use the dense-transformer count. A forward pass costs 2 N per token position (N the
base model's parameters: one multiply-add per weight), padding included, since it is
computed. A backward pass through the frozen base costs another 2 N per position
(activation gradients; the frozen weights need no weight gradients) plus 2 N_a for the
adapter's own weight gradients. A sketch adds 2 p d per projected sample (P^T g, p the
gradient length, d the sketch dimension). ``TokenCounter`` counts positions at the model's
output layer, so every handler's forward and backward passes are counted in one place.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch
from torch import nn

USAGE_KEYS = ("forward-tokens", "backward-tokens", "projected-rows", "peak-rss-bytes", "cuda-max-allocated-bytes")


@dataclass
class Usage:
    """What one client did for one reply: token positions through the model, projected samples, peak memory."""

    forward_tokens: int = 0
    backward_tokens: int = 0
    projected_rows: int = 0
    peak_rss_bytes: int = 0
    cuda_max_allocated_bytes: int = 0

    def metrics(self) -> dict[str, int]:
        """As MetricRecord entries (``forward-tokens``, ...)."""
        return {f.name.replace("_", "-"): int(getattr(self, f.name)) for f in fields(self)}


@dataclass
class TokenCounter:
    """Counts token positions through a model's output layer, forward and backward."""

    forward: int = 0
    backward: int = 0
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def attach(self, model: nn.Module) -> TokenCounter:
        output = model.get_output_embeddings()  # type: ignore[operator]
        if output is None:
            raise ValueError("the model has no output embeddings to count tokens at")
        self._handles.append(output.register_forward_hook(self._on_forward))
        return self

    def _on_forward(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        positions = int(out.shape[0] * out.shape[1]) if out.dim() == 3 else int(out.shape[0])
        self.forward += positions
        if out.requires_grad:
            out.register_hook(lambda grad: self._on_backward(positions))

    def _on_backward(self, positions: int) -> None:
        self.backward += positions

    @contextlib.contextmanager
    def measure(self) -> Iterator[Usage]:
        """A ``Usage`` filled with what runs inside the block (tokens) and the process's peaks so far."""
        usage = Usage()
        forward, backward = self.forward, self.backward
        try:
            yield usage
        finally:
            usage.forward_tokens = self.forward - forward
            usage.backward_tokens = self.backward - backward
            usage.peak_rss_bytes = peak_rss_bytes()
            if torch.cuda.is_available():
                usage.cuda_max_allocated_bytes = int(torch.cuda.max_memory_allocated())


def base_parameter_count(model: nn.Module) -> int:
    """N: the frozen parameters, counting a 4-bit packed weight by its original shape."""
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        quant_state = getattr(param, "quant_state", None)
        total += int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class ModelSize:
    """What FLOPs are counted from: base parameters N, adapter parameters N_a, gradient length p, sketch d."""

    base_params: int
    adapter_params: int
    gradient_dim: int
    sketch_dim: int

    def flops(self, forward_tokens: float, backward_tokens: float, projected_rows: float) -> dict[str, float]:
        return {
            "forward": 2.0 * self.base_params * forward_tokens,
            "backward": (2.0 * self.base_params + 2.0 * self.adapter_params) * backward_tokens,
            "sketch": 2.0 * self.gradient_dim * self.sketch_dim * projected_rows,
        }
