"""Attaching a seeded LoRA adapter (through peft) to the frozen base model.

The adapter's initial value theta* must be identical on every client and on the server:
A is random, B is zero, and A comes from ``adapter.seed`` alone, independent of the
global RNG state and of the device.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from elora_fed.config import AdapterConfig
from elora_fed.errors import ConfigError


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


def trainable_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by name (what clients and the server exchange)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
