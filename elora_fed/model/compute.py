"""The dtype model passes compute in: fp32, or bf16 autocast where the hardware runs it fast.

``model.precision`` is how the frozen weights are stored; ``model.compute_dtype`` is the
arithmetic of every forward and backward pass over them. Under bf16 autocast the weights
stay fp32 (the adapter's optimizer state and gradients too) and each matmul runs in bf16,
which CPUs with AVX-512 BF16 or AMX and most GPUs execute natively. The scalar outputs h
and the losses are computed from the logits in fp32 (``elora_fed.model.log_odds``).

Arithmetic on the passes' results (``full_precision``) stays fp32: per-sample gradients
are assembled and projected in fp32 from the bf16 activations and output gradients.

``auto`` picks bf16 for fp32 and nf4 models on hardware with native bf16 matmuls; there
``experiments/throughput.py`` measures it faster with losses that agree (its results
record by how much: on an AVX-512 BF16 CPU, 2.2x for fp32 training and 1.9x for nf4, whose
dequantized weights then multiply in bf16, as bitsandbytes' own compute dtype does on
CUDA). A bf16 model already computes in bf16, so ``auto`` leaves it alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

from elora_fed.errors import ModelLoadError
from elora_fed.model.config import ModelConfig

Params = ParamSpec("Params")
Result = TypeVar("Result")


def resolve_device(device: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` is CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware (AVX-512 BF16 or AMX on CPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_compute_dtype(cfg: ModelConfig) -> str:
    """``fp32`` or ``bf16``: what ``cfg.compute_dtype`` means on this machine."""
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    if cfg.precision in ("fp32", "nf4") and native_bf16(resolve_device(cfg.device)):
        return "bf16"
    return "fp32"


def compute_context(cfg: ModelConfig) -> contextlib.AbstractContextManager[object]:
    """A context in which model passes run in the resolved compute dtype."""
    if resolve_compute_dtype(cfg) == "bf16":
        # No cast cache: autocast caches the bf16 copy of every trainable leaf (the adapter)
        # until the context exits, and a handler loads other adapter weights and takes
        # optimizer steps inside one context; a cached copy would silently keep the old ones.
        return torch.autocast(resolve_device(cfg.device).type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def full_precision(fn: Callable[Params, Result]) -> Callable[Params, Result]:
    """Run ``fn`` with autocast off: arithmetic on model results (assembling per-sample
    gradients, the JL projection) stays fp32 whatever dtype the model passes ran in."""

    @functools.wraps(fn)
    def wrapper(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        with torch.autocast("cpu", enabled=False):
            if not torch.cuda.is_available():
                return fn(*args, **kwargs)
            with torch.autocast("cuda", enabled=False):
                return fn(*args, **kwargs)

    return wrapper
