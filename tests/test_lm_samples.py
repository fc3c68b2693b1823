import numpy as np
import pytest

from elora_fed.data import lm_samples
from elora_fed.data.config import DataConfig
from elora_fed.data.lm_samples import LMSamples, build_clients, prepare, token_blocks
from elora_fed.data.splits import split_contiguous
from elora_fed.errors import DataError

WORDS = [
    "thou",
    "art",
    "more",
    "lovely",
    "and",
    "more",
    "temperate",
    "rough",
    "winds",
    "do",
    "shake",
    "the",
    "darling",
    "buds",
    "of",
    "may",
]


def _texts(sizes: dict[str, int]) -> dict[str, str]:
    return {
        cid: " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) for i, (cid, n) in enumerate(sizes.items())
    }


def test_splits_are_contiguous_disjoint_and_cover_the_stream():
    ids = list(range(1000))
    blocks = token_blocks(ids, 16)
    assert blocks.shape == (62, 16)
    splits = split_contiguous("c", blocks, 0.1, 0.1)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [50, 6, 6]
    joined = np.concatenate([splits["train"], splits["validation"], splits["test"]]).reshape(-1)
    assert joined.tolist() == ids[: 62 * 16]  # in order, nothing shared, nothing reordered
    assert split_contiguous("c", blocks, 0.01, 0.01)["validation"].shape[0] == 1  # at least one each
    samples = [(f"t{i}", 0) for i in range(5)]  # lists split the same way as arrays
    assert split_contiguous("c", samples, 0.1, 0.1) == {
        "train": samples[:3],
        "validation": [samples[3]],
        "test": [samples[4]],
    }


def test_build_clients_filters_selects_largest_and_sorts(tokenizer):
    texts = _texts({"z:big": 2000, "a:mid": 800, "m:small": 30, "b:large": 1500})
    cfg = DataConfig(seq_len=16, min_samples=10, num_clients=2)
    data = build_clients(texts, tokenizer, cfg)
    assert [c.client_id for c in data.clients] == ["b:large", "z:big"]  # two largest, sorted by id
    assert data.candidates == 4
    again = build_clients(texts, tokenizer, cfg)
    for a, b in zip(data.clients, again.clients, strict=True):
        for split in lm_samples.SPLITS:
            np.testing.assert_array_equal(a.splits[split], b.splits[split])
    capped = build_clients(texts, tokenizer, DataConfig(seq_len=16, min_samples=10, max_samples_per_client=12))
    assert [c.client_id for c in capped.clients] == ["a:mid", "b:large", "z:big"]  # small one filtered
    assert all(c.num_samples == 12 for c in capped.clients)
    # the largest are chosen by their full size, then capped: not alphabetically among equals
    largest = build_clients(texts, tokenizer, DataConfig(seq_len=16, num_clients=1, max_samples_per_client=12))
    assert [c.client_id for c in largest.clients] == ["z:big"]
    np.testing.assert_array_equal(largest.clients[0].splits["train"], data.client("z:big").splits["train"][:10])


def test_empty_client_and_impossible_lengths_are_named(tokenizer):
    with pytest.raises(DataError, match="client 'hamlet:NOBODY' has no samples in its validation split"):
        LMSamples(
            "hamlet:NOBODY", {"train": np.zeros((3, 8)), "validation": np.zeros((0, 8)), "test": np.zeros((1, 8))}
        )
    texts = _texts({"a:one": 300})
    with pytest.raises(DataError, match=r"data\.seq_len = 100000000 is impossible"):
        build_clients(texts, tokenizer, DataConfig(seq_len=100_000_000))
    with pytest.raises(DataError, match=r"no client has data\.min_samples = 10 samples of data\.seq_len = 1024"):
        build_clients(texts, tokenizer, DataConfig(seq_len=1024))


def test_prepare_caches_once_and_is_atomic(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ELORA_FED_CACHE", str(tmp_path))
    texts = _texts({"a:one": 900, "b:two": 700})
    cfg = DataConfig(seq_len=16)

    real_save = np.save

    def interrupted_save(path, array):
        real_save(path, array)  # the tokens are written, then the run is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_samples.np, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        prepare("fp", lambda: texts, tokenizer, cfg)
    assert not any((tmp_path / "datasets").iterdir())  # nothing half-written left behind
    monkeypatch.setattr(lm_samples.np, "save", real_save)

    calls = []

    def load():
        calls.append(1)
        return texts

    first = prepare("fp", load, tokenizer, cfg)
    second = prepare("fp", load, tokenizer, cfg)
    assert calls == [1]  # second call served from the cache
    assert [c.client_id for c in second.clients] == ["a:one", "b:two"]
    for a, b in zip(first.clients, second.clients, strict=True):
        np.testing.assert_array_equal(a.splits["test"], b.splits["test"])
    prepare("fp", load, tokenizer, DataConfig(seq_len=32))
    assert calls == [1, 1]  # a different setting prepares anew
