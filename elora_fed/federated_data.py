"""The clients of a run, from the source that ``data.source`` names.

Language-modelling sources (``shakespeare`` offline, ``flwr-shakespeare`` from the hub)
give one text per client and go through ``lm_samples``; ``classification`` gives one task
per client (``elora_fed.classification``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from elora_fed import lm_samples, shakespeare, shakespeare_hub
from elora_fed.classification import ClassificationSamples, load_classification_tasks, split_task, tokenize_task
from elora_fed.config import DataConfig
from elora_fed.lm_samples import ClientSamples, FederatedSamples


def shakespeare_texts_dir(cfg: DataConfig) -> Path:
    return Path(cfg.path).expanduser() if cfg.path else shakespeare.default_texts_dir()


def load_lm_clients(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> FederatedSamples:
    """Prepared (cached) next-token samples for every kept client of an LM source."""
    if cfg.source == "shakespeare":
        texts_dir = shakespeare_texts_dir(cfg)
        files = shakespeare.play_files(texts_dir)
        listing = "|".join(f"{f.name}:{f.stat().st_size}" for f in files)
        fingerprint = f"gutenberg:{hashlib.sha256(listing.encode()).hexdigest()}"

        def load() -> dict[str, str]:
            return {role.client_id: role.text for role in shakespeare.load_roles(texts_dir)}

        return lm_samples.prepare(fingerprint, load, tokenizer, cfg)
    if cfg.source == "flwr-shakespeare":
        return lm_samples.prepare("flwrlabs/shakespeare", shakespeare_hub.load_flwr_shakespeare, tokenizer, cfg)
    raise ValueError(f"data.source = {cfg.source!r} is not a language-modelling source")


def load_classification_clients(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[ClassificationSamples]:
    """``clients_per_task`` tokenized clients per task, sorted by id; prompts hold at most ``seq_len`` tokens."""
    tasks = load_classification_tasks(cfg.path, cfg.val_fraction, cfg.test_fraction)
    clients = sorted((c for task in tasks for c in split_task(task, cfg.clients_per_task)), key=lambda c: c.name)
    return [tokenize_task(client, tokenizer, cfg.seq_len) for client in clients]


def load_clients(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> list[ClientSamples] | list[ClassificationSamples]:
    """The run's clients, sorted by id, whatever the source."""
    if cfg.source == "classification":
        return load_classification_clients(cfg, tokenizer)
    return list(load_lm_clients(cfg, tokenizer).clients)
