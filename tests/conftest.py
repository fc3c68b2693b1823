"""Shared test fixtures."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from elora_fed.config import ModelConfig
from elora_fed.models import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, via the tiny random model (built from the embedded GGUF once, then cached)."""
    return load_tokenizer(ModelConfig(name="tiny-random"))
