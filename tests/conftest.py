"""Shared test fixtures."""

from __future__ import annotations

import os

# Tests never reach a hub: without this, a hub id is retried over the network for ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`-n 2`, pyproject) each worker owns one of the two cores: more torch
# threads than cores make both workers spin. Subprocesses (the CLI, SuperNodes) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from transformers import PreTrainedTokenizerBase

from elora_fed.model.config import ModelConfig
from elora_fed.model.models import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, via the tiny random model (built from the embedded GGUF once, then cached)."""
    return load_tokenizer(ModelConfig(name="tiny-random"))
