"""Stop, by name, when a backward pass carries no signal: never train or sketch on zero gradients.

A frozen base layer whose forward has no autograd formula (bitsandbytes' fused CPU
inference kernel is one) cuts every path from the adapter to the loss. Autograd then
returns exactly zero gradients, with at most a warning, and Adam steps on zeros leave the
adapter where it was. A finite loss with all-zero gradients is that failure, not a minimum:
at theta* the LoRA B gradients are nonzero for any real sample, and an exact zero of every
element is not a numerical accident.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from elora_fed.errors import ZeroGradientError
from elora_fed.model.models import quantized_modules


def describe_model(model: nn.Module) -> str:
    """The base model's name and precision as a user configured them, for error messages."""
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or type(model).__name__
    if quantized_modules(model):
        precision = "nf4"
    else:
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(next(model.parameters()).dtype, "?")
    return f"model {name!r} in {precision}"


def check_gradients(model: nn.Module, loss: torch.Tensor, gradients: Iterable[torch.Tensor | None], where: str) -> None:
    """Raise ZeroGradientError if ``loss`` is finite and every one of ``gradients`` is exactly zero."""
    if not bool(torch.isfinite(loss).all()):
        return
    if any(g is not None and bool(g.ne(0).any()) for g in gradients):
        return
    raise ZeroGradientError(
        f"{where}: every trainable gradient of {describe_model(model)} is exactly zero at a finite loss "
        f"({float(loss.detach().float().mean()):.4f}), so this step would learn nothing. A base-model layer "
        f"has no autograd path (for 4-bit models, install the tested bitsandbytes from constraints.txt)."
    )
