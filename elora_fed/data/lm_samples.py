"""Next-token language-modelling samples per client: cut, split, selected and cached.

Each client's text is tokenized once (no special tokens, so every phase sees the same
ids), cut into non-overlapping blocks of ``seq_len`` tokens, and split into contiguous
train / validation / test blocks in text order. Because the blocks never overlap and the
splits are contiguous, no token of text is shared across splits. Clients are identified by
stable string ids and always listed sorted by id, so rows can be aligned with samples
without depending on file listing or loader order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from elora_fed.data.config import DataConfig
from elora_fed.data.splits import SPLITS, split_contiguous
from elora_fed.errors import DataError
from elora_fed.paths import atomic_directory, cache_root

_FORMAT_VERSION = 2


@dataclass(frozen=True)
class LMSamples:
    """One language-model client's samples: ``splits[name]`` is an int array of token ids, shape (n, seq_len)."""

    client_id: str
    splits: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        for name in SPLITS:
            if name not in self.splits or len(self.splits[name]) == 0:
                raise DataError(f"client '{self.client_id}' has no samples in its {name} split")

    @property
    def num_samples(self) -> int:
        return sum(len(a) for a in self.splits.values())


@dataclass(frozen=True)
class FederatedSamples:
    """The clients of a run, sorted by id, plus how many candidates there were."""

    clients: tuple[LMSamples, ...]
    candidates: int
    seq_len: int

    def client(self, client_id: str) -> LMSamples:
        for c in self.clients:
            if c.client_id == client_id:
                return c
        raise DataError(f"unknown client '{client_id}'")

    def stats(self) -> dict[str, object]:
        counts = np.array([c.num_samples for c in self.clients])
        return {
            "candidates": self.candidates,
            "clients": len(self.clients),
            "seq_len": self.seq_len,
            "samples_total": int(counts.sum()),
            "samples_per_client": {
                "min": int(counts.min()),
                "p25": float(np.percentile(counts, 25)),
                "median": float(np.median(counts)),
                "p75": float(np.percentile(counts, 75)),
                "max": int(counts.max()),
            },
            "split_totals": {s: int(sum(len(c.splits[s]) for c in self.clients)) for s in SPLITS},
        }


def token_blocks(ids: list[int], seq_len: int) -> np.ndarray:
    """Non-overlapping consecutive blocks of ``seq_len`` tokens; the remainder is dropped."""
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def build_clients(texts: dict[str, str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> FederatedSamples:
    """Tokenize, cut, filter and split every client's text (no caching; see ``prepare``)."""
    _check_seq_len(cfg.seq_len, tokenizer)
    blocks: dict[str, np.ndarray] = {}
    for client_id in sorted(texts):
        ids = tokenizer(texts[client_id], add_special_tokens=False, verbose=False)["input_ids"]
        client_blocks = token_blocks(ids, cfg.seq_len)
        if len(client_blocks) >= cfg.min_samples:
            blocks[client_id] = client_blocks
    if not blocks:
        longest = max((len(t) for t in texts.values()), default=0)
        raise DataError(
            f"no client has data.min_samples = {cfg.min_samples} samples of data.seq_len = {cfg.seq_len} tokens "
            f"(the longest of {len(texts)} texts has {longest} characters): lower data.seq_len or data.min_samples"
        )
    # The largest clients by their full text; the cap (first samples in text order) comes after.
    kept = sorted(blocks, key=lambda cid: (-len(blocks[cid]), cid))
    if cfg.num_clients:
        kept = kept[: cfg.num_clients]
    cap = cfg.max_samples_per_client or None
    clients = tuple(
        LMSamples(cid, split_contiguous(cid, blocks[cid][:cap], cfg.val_fraction, cfg.test_fraction))
        for cid in sorted(kept)
    )
    return FederatedSamples(clients=clients, candidates=len(texts), seq_len=cfg.seq_len)


def _check_seq_len(seq_len: int, tokenizer: PreTrainedTokenizerBase) -> None:
    limit = tokenizer.model_max_length
    if seq_len < 2 or seq_len > limit:
        raise DataError(f"data.seq_len = {seq_len} is impossible for this tokenizer: it must be in [2, {limit}]")


def prepare(
    texts_fingerprint: str,
    load_texts: Callable[[], dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
) -> FederatedSamples:
    """Load prepared samples from the cache, or build and cache them (atomically) once.

    The cache key covers the source texts (``texts_fingerprint``), the tokenizer's
    vocabulary and every data setting, so a change in any of them prepares anew.
    """
    key = _cache_key(texts_fingerprint, tokenizer, cfg)
    entry = cache_root() / "datasets" / key
    if not (entry / "index.json").is_file():
        samples = build_clients(load_texts(), tokenizer, cfg)
        with atomic_directory(entry) as tmp:
            _write(samples, tmp)
    return _read(entry)


def _cache_key(texts_fingerprint: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    settings = json.dumps(
        {
            "version": _FORMAT_VERSION,
            "texts": texts_fingerprint,
            "vocab": hashlib.sha256(vocab).hexdigest(),
            "seq_len": cfg.seq_len,
            "min_samples": cfg.min_samples,
            "num_clients": cfg.num_clients,
            "max_samples_per_client": cfg.max_samples_per_client,
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(settings).hexdigest()[:16]


def _write(samples: FederatedSamples, folder: Path) -> None:
    rows, index, start = [], [], 0
    for client in samples.clients:
        spans = {}
        for name in SPLITS:
            block = client.splits[name]
            rows.append(block)
            spans[name] = [start, start + len(block)]
            start += len(block)
        index.append({"client_id": client.client_id, "spans": spans})
    np.save(folder / "tokens.npy", np.concatenate(rows))
    meta = {"candidates": samples.candidates, "seq_len": samples.seq_len, "clients": index}
    (folder / "index.json").write_text(json.dumps(meta, indent=1))


def _read(folder: Path) -> FederatedSamples:
    meta = json.loads((folder / "index.json").read_text())
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    clients = tuple(
        LMSamples(c["client_id"], {name: np.asarray(tokens[a:b]) for name, (a, b) in c["spans"].items()})
        for c in meta["clients"]
    )
    return FederatedSamples(clients=clients, candidates=meta["candidates"], seq_len=meta["seq_len"])
