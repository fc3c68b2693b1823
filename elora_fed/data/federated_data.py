"""The clients of a run, from the source that ``data.source`` names.

Language-modelling sources (``shakespeare`` offline, ``flwr-shakespeare`` from the hub)
give one text per client and go through ``lm_samples``; ``classification`` gives one task
per client (``elora_fed.data.classification``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from elora_fed.data import lm_samples, shakespeare, shakespeare_hub
from elora_fed.data.classification import (
    ClassificationSamples,
    LabelledPrompts,
    cap_samples,
    load_classification_tasks,
    split_task,
    tokenize_task,
)
from elora_fed.data.config import DataConfig
from elora_fed.data.lm_samples import FederatedSamples, LMSamples
from elora_fed.data.splits import SPLITS


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
    """``clients_per_task`` tokenized clients per task, sorted by id; prompts hold at most ``seq_len`` tokens.

    Each client keeps at most about ``max_samples_per_client`` samples (0: all; ``cap_samples``).
    """
    tasks = load_classification_tasks(cfg.path, cfg.val_fraction, cfg.test_fraction)
    dealt = (
        cap_samples(c, cfg.max_samples_per_client) for task in tasks for c in split_task(task, cfg.clients_per_task)
    )
    clients = sorted(dealt, key=lambda c: c.name)
    return [tokenize_task(client, tokenizer, cfg.seq_len) for client in clients]


def classification_stats(clients: list[ClassificationSamples]) -> dict[str, Any]:
    """What ``elora-fed data-stats`` prints for a classification source: per client, each split's
    size, its count per label index, and its prompt lengths in tokens."""

    def split_stats(prompts: LabelledPrompts) -> dict[str, Any]:
        lengths = [len(ids) for ids in prompts.input_ids]
        counts = Counter(prompts.labels)
        return {
            "samples": len(prompts.labels),
            "per_label": [counts[i] for i in range(max(counts, default=-1) + 1)],
            "max_tokens": max(lengths, default=0),
            "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1),
        }

    splits = {c.client_id: {s: split_stats(p) for s, p in c.splits.items()} for c in clients}
    per_client = {c.client_id: {"labels": len(c.label_token_ids), **splits[c.client_id]} for c in clients}
    totals = {s: sum(v[s]["samples"] for v in splits.values()) for s in SPLITS}
    return {"clients": len(clients), "samples": totals, "per_client": per_client}


def load_clients(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[LMSamples] | list[ClassificationSamples]:
    """The run's clients, sorted by id, whatever the source."""
    if cfg.source == "classification":
        return load_classification_clients(cfg, tokenizer)
    return list(load_lm_clients(cfg, tokenizer).clients)
