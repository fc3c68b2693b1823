"""Attaching a seeded LoRA adapter (through peft) to the frozen base model, and reading or setting its weights.

The adapter's initial value theta* must be identical on every client and on the server:
A is random, B is zero, and A comes from ``adapter.seed`` alone, independent of the
global RNG state and of the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from elora_fed.errors import ConfigError, DataError
from elora_fed.model.config import AdapterConfig
from elora_fed.paths import atomic_directory

AdapterState = dict[str, torch.Tensor]
"""An adapter's trainable tensors by parameter name: what is sent, averaged, saved and loaded."""

_ADAPTER_NAME = ".default."  # peft's name for the one adapter, which its saved files leave out


def lora_config(cfg: AdapterConfig) -> LoraConfig:
    targets: str | list[str] = "all-linear" if cfg.target_modules == "all-linear" else cfg.target_module_list
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, cfg: AdapterConfig) -> PeftModel:
    """Wrap ``model`` with a LoRA adapter whose initial weights depend only on ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            peft_model = get_peft_model(model, lora_config(cfg))
        except ValueError as e:
            raise ConfigError(f"adapter.target_modules = {cfg.target_modules!r} does not fit the model: {e}") from e
    return peft_model


def adapter_state(model: nn.Module) -> AdapterState:
    """A copy of the trainable (adapter) tensors, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, state: AdapterState) -> None:
    """Set the trainable tensors from ``state`` (e.g. back to theta*)."""
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise KeyError(f"adapter state has tensors the model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_peft_adapter(state: AdapterState, cfg: AdapterConfig, base_model: str, path: Path) -> Path:
    """Write ``state`` as a peft adapter directory (``PeftModel.from_pretrained`` loads it), atomically."""
    config = lora_config(cfg)
    config.base_model_name_or_path = base_model
    tensors = {name.replace(_ADAPTER_NAME, "."): t.detach().cpu().contiguous() for name, t in state.items()}
    with atomic_directory(path) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
    return path


def load_peft_adapter(path: Path) -> AdapterState:
    """The adapter tensors of a directory written by ``save_peft_adapter``, named as in the model."""
    file = path / "adapter_model.safetensors"
    try:
        json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(str(file))
    except (OSError, ValueError, SafetensorError) as e:
        raise DataError(f"cannot read the adapter in {path}: {e}") from e
    return {_with_adapter_name(name): t for name, t in tensors.items()}


def _with_adapter_name(name: str) -> str:
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            return name.replace(part, f"{part[:-1]}{_ADAPTER_NAME}", 1)
    return name
