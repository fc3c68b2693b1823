"""Tests for the flwr-shakespeare source, on an in-memory LEAF-style dataset."""

from __future__ import annotations

import datasets
import pytest
from datasets import Dataset

from elora_fed.data.shakespeare_hub import load_flwr_shakespeare, roles_from_dataset, stitch_windows
from elora_fed.errors import DataError

ROMEO = "But soft, what light"
JULIET = "O Romeo, Romeo"


def _windows(character: str, text: str, width: int = 8) -> list[tuple[str, str, str]]:
    """LEAF-style samples: each window of ``width`` characters and the character after it."""
    return [(character, text[i : i + width], text[i + width]) for i in range(len(text) - width)]


def _dataset() -> Dataset:
    romeo = _windows("ROMEO", ROMEO)
    juliet = _windows("JULIET", JULIET)
    # the nurse's windows jump: the second line does not continue the first
    nurse = _windows("NURSE", "Faith, I can") + _windows("NURSE", "Now, afore God")
    rows = nurse[:2] + romeo + juliet[:3] + nurse[2:] + juliet[3:]  # characters interleaved
    return Dataset.from_dict(
        {
            "character_id": [c for c, _, _ in rows],
            "x": [x for _, x, _ in rows],
            "y": [y for _, _, y in rows],
        }
    )


def test_roles_are_rebuilt_per_character() -> None:
    roles = roles_from_dataset(_dataset())
    assert list(roles) == ["flwr:JULIET", "flwr:NURSE", "flwr:ROMEO"]
    assert roles["flwr:ROMEO"] == ROMEO
    assert roles["flwr:JULIET"] == JULIET
    assert roles["flwr:NURSE"] == "Faith, I can\nNow, afore God"


def test_stitch_windows() -> None:
    assert stitch_windows(["abc", "bcd", "xyz"], ["d", "e", "!"]) == "abcde\nxyz!"
    assert stitch_windows([], []) == ""


def test_missing_column() -> None:
    data = Dataset.from_dict({"character_id": ["A"], "x": ["abc"]})
    with pytest.raises(DataError, match=r"lacks column\(s\) y"):
        roles_from_dataset(data)


def test_load_reads_the_hub_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str) -> Dataset:
        calls.append((name, split))
        return _dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_flwr_shakespeare()["flwr:ROMEO"] == ROMEO
    assert calls == [("flwrlabs/shakespeare", "train")]


def test_load_offline_points_to_the_gutenberg_source(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, split: str) -> Dataset:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r'hub is unreachable.*data\.source = "shakespeare"'):
        load_flwr_shakespeare()
