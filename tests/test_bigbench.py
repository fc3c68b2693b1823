"""Tests for the BIG-bench tasks: extraction from the sdist, conversion, splits, clients per task.

``tests/fixtures/bigbench`` holds real examples of three tasks, copied from the
``bigbench==1.0.0`` sdist (the first few of each label, in file order). Archives are built
from them here; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from elora_fed import cli
from elora_fed.config import RunConfig
from elora_fed.data import bigbench
from elora_fed.data.bigbench import (
    LABEL_WORDS,
    SDIST_SHA256,
    TASKS_ROOT,
    convert_task,
    fetch_bigbench,
    stratified_split,
)
from elora_fed.data.classification import (
    ClassificationTask,
    cap_samples,
    label_token_ids,
    load_classification_tasks,
    split_task,
)
from elora_fed.data.config import DataConfig
from elora_fed.data.federated_data import load_classification_clients
from elora_fed.data.splits import SPLITS
from elora_fed.errors import ConfigError, DataError

FIXTURE = Path(__file__).parent / "fixtures" / "bigbench"
TASKS = ("fact_checker/politifact", "intent_recognition", "sports_understanding")
SPORTS_PREFIX = "Determine whether the following statement or statements are plausible or implausible:\nStatement: "


def _task_json(task: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURE / task / "task.json").read_text()))


def _archive(folder: Path) -> tuple[Path, str]:
    """A tiny sdist: the fixture tasks, plus files and a task that must not be extracted."""
    members = {f"{TASKS_ROOT}{task}/task.json": (FIXTURE / task / "task.json").read_bytes() for task in TASKS}
    members[f"{TASKS_ROOT}winowhy/task.json"] = b'{"examples": []}'
    members[f"{TASKS_ROOT}sports_understanding/README.md"] = b"# not a task file"
    members["bigbench-1.0.0/setup.py"] = b"# setup"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Path:
    out = tmp_path_factory.mktemp("bigbench")
    bigbench.write_dataset(FIXTURE, TASKS, tokenizer, out)
    return out / bigbench.JSONL_NAME


def test_fetch_extracts_only_the_chosen_tasks(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    archive, sha256 = _archive(tmp_path / "download")
    dest = tmp_path / "cache" / "bigbench"
    jsonl = fetch_bigbench(dest, archive, TASKS, tokenizer, sha256)
    assert jsonl == dest / "tasks.jsonl"
    extracted = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    outputs = ["tasks.jsonl", "tasks.labels.json", "tasks.stats.json"]
    assert extracted == sorted([f"benchmark_tasks/{task}/task.json" for task in TASKS] + outputs)
    assert (dest / "benchmark_tasks" / TASKS[0] / "task.json").read_bytes() == (
        FIXTURE / TASKS[0] / "task.json"
    ).read_bytes()
    assert archive.is_file()  # a local archive is the caller's: kept
    assert [p.name for p in dest.parent.iterdir()] == ["bigbench"]  # no partial or download folder left
    tasks = {t.name: t for t in load_classification_tasks(str(jsonl))}
    assert sorted(tasks) == sorted(TASKS)
    assert tasks["intent_recognition"].label_words == tuple(LABEL_WORDS["intent_recognition"].values())
    stats = json.loads((dest / "tasks.stats.json").read_text())["tasks"]
    sports = stats["sports_understanding"]
    assert (sports["examples"], sports["kept"], sports["dropped_malformed"], sports["dropped_too_long"]) == (
        12,
        12,
        0,
        0,
    )
    assert sports["splits"] == {
        "train": {"implausible": 4, "plausible": 4},
        "validation": {"implausible": 1, "plausible": 1},
        "test": {"implausible": 1, "plausible": 1},
    }
    assert sports["majority_test_accuracy"] == 0.5
    assert [len(tasks["intent_recognition"].splits[s]) for s in SPLITS] == [7, 7, 7]  # 3 per label: 1/1/1


def test_fetch_again_reads_nothing(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    archive, sha256 = _archive(tmp_path / "download")
    dest = tmp_path / "bigbench"
    jsonl = fetch_bigbench(dest, archive, TASKS, tokenizer, sha256)
    before = jsonl.stat().st_mtime_ns
    archive.unlink()
    assert fetch_bigbench(dest, archive, TASKS, tokenizer=None, sha256=sha256) == jsonl  # no archive, no tokenizer
    assert jsonl.stat().st_mtime_ns == before
    with pytest.raises(DataError, match=r"already holds BIG-bench tasks .*not \['sports_understanding'\]"):
        fetch_bigbench(dest, archive, ("sports_understanding",), tokenizer, sha256)


def test_truncated_archive_is_named_and_leaves_nothing(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    archive, _ = _archive(tmp_path / "download")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "bigbench"
    with pytest.raises(DataError, match=r"cannot read .*bigbench-1.0.0.tar.gz as a .tar.gz archive"):
        fetch_bigbench(dest, archive, TASKS, tokenizer, sha256)
    assert list(dest.parent.iterdir()) == []


def test_wrong_sha256_is_refused_before_extracting(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    archive, sha256 = _archive(tmp_path / "download")
    dest = tmp_path / "cache" / "bigbench"
    with pytest.raises(DataError, match=f"has sha256 {sha256}, expected {SDIST_SHA256}"):
        fetch_bigbench(dest, archive, TASKS, tokenizer)  # the pinned hash of the real sdist
    assert list(dest.parent.iterdir()) == []


def test_cli_names_a_wrong_archive_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive, _ = _archive(tmp_path)
    code = cli.main(["fetch-data", "--bigbench-archive", str(archive), "--dest", str(tmp_path / "bb")])
    err = capsys.readouterr().err
    assert code == 2 and "expected 1bb398a5" in err and "Traceback" not in err


def test_unknown_or_missing_task(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    archive, sha256 = _archive(tmp_path / "download")
    with pytest.raises(DataError, match=r"unknown BIG-bench task\(s\) \['nope'\]: choose from epistemic_reasoning"):
        fetch_bigbench(tmp_path / "a", archive, ("sports_understanding", "nope"), tokenizer, sha256)
    with pytest.raises(DataError, match=r"holds no .*<task>/task.json for task\(s\) strategyqa"):
        fetch_bigbench(tmp_path / "b", archive, ("sports_understanding", "strategyqa"), tokenizer, sha256)
    assert not (tmp_path / "b").exists()


class _Index:
    """A fake package index serving a simple page and the archive; records what was asked."""

    def __init__(self, archive: bytes, href: str) -> None:
        self.urls: list[str] = []
        self.pages = {
            "https://index.example/simple/bigbench/": f'<a href="{href}">bigbench-1.0.0.tar.gz</a>'.encode(),
            "https://index.example/packages/ab/bigbench-1.0.0.tar.gz": archive,
        }

    def __call__(self, url: str) -> io.BytesIO:
        self.urls.append(url)
        return io.BytesIO(self.pages[url])


def test_download_finds_the_sdist_on_pips_index(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, sha256 = _archive(tmp_path / "built")
    index = _Index(archive.read_bytes(), f"../../packages/ab/bigbench-1.0.0.tar.gz#sha256={sha256}")
    monkeypatch.setenv("PIP_INDEX_URL", "https://index.example/simple/")
    monkeypatch.setattr(bigbench, "_urlopen", index)
    dest = tmp_path / "cache" / "bigbench"
    assert fetch_bigbench(dest, None, TASKS, tokenizer, sha256).is_file()
    assert index.urls == list(index.pages)
    assert [p.name for p in dest.parent.iterdir()] == ["bigbench"]  # the downloaded archive is deleted


@pytest.mark.parametrize(
    ("href", "served", "message"),
    [
        ("../../packages/ab/bigbench-1.0.0.tar.gz#sha256=00ff", b"", "lists bigbench-1.0.0.tar.gz with sha256 00ff"),
        ("../../packages/ab/bigbench-1.0.0.tar.gz#sha256={pin}", b"not the sdist", "has sha256 .*, expected {pin}"),
        (
            "../../packages/ab/bigbench-0.9.tar.gz",
            b"",
            "lists no bigbench-1.0.0.tar.gz \\(it lists: bigbench-0.9.tar.gz\\).*--bigbench-archive",
        ),
    ],
)
def test_download_refuses_what_does_not_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, href: str, served: bytes, message: str
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "https://index.example/simple")
    monkeypatch.setattr(bigbench, "_urlopen", _Index(served, href.format(pin=SDIST_SHA256)))
    with pytest.raises(DataError, match=message.format(pin=SDIST_SHA256)):
        fetch_bigbench(tmp_path / "cache" / "bigbench", tokenizer=object())  # type: ignore[arg-type]
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.e2e
def test_index_url_falls_back_to_pypi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    unset = subprocess.CompletedProcess([], 1, "", "ERROR: No such key - global.index-url")
    monkeypatch.setattr(bigbench.subprocess, "run", lambda *a, **k: unset)
    assert bigbench.index_url() == "https://pypi.org/simple"
    configured = subprocess.CompletedProcess([], 0, "https://mirror.example/simple\n", "")
    monkeypatch.setattr(bigbench.subprocess, "run", lambda *a, **k: configured)
    assert bigbench.index_url() == "https://mirror.example/simple"


def test_conversion_drops_malformed_and_long_examples(tokenizer: PreTrainedTokenizerBase) -> None:
    task = _task_json("sports_understanding")
    task["examples"] += [
        {"input": "two answers", "target_scores": {"plausible": 1, "implausible": 1}},
        {"input": "no answer", "target_scores": {"plausible": 0, "implausible": 0}},
        {"input": "half an answer", "target_scores": {"plausible": 0.5, "implausible": 1}},
        {"input": "an unknown label", "target_scores": {"maybe": 1, "plausible": 0}},
        {"input": "no scores", "target": "plausible"},
        {"target_scores": {"plausible": 1, "implausible": 0}},
        {"input": "word " * 200, "target_scores": {"plausible": 1, "implausible": 0}},
    ]
    examples, counts = convert_task("sports_understanding", task, tokenizer)
    assert counts == {"examples": 19, "dropped_malformed": 6, "dropped_too_long": 1, "dropped_over_cap": 0}
    assert len(examples) == 12
    assert (SPORTS_PREFIX + "Jamal Murray was perfect from the line", "plausible") in examples
    assert convert_task("sports_understanding", task, tokenizer) == (examples, counts)  # seeded shuffle


def test_large_tasks_are_capped_after_the_shuffle(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bigbench, "MAX_EXAMPLES", 5)
    examples, counts = convert_task("sports_understanding", _task_json("sports_understanding"), tokenizer)
    assert len(examples) == 5 and counts["dropped_over_cap"] == 7
    in_file_order = [SPORTS_PREFIX + e["input"] for e in _task_json("sports_understanding")["examples"][:5]]
    assert [text for text, _ in examples] != in_file_order


def test_label_words_have_distinct_first_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    for name, words in LABEL_WORDS.items():
        task = ClassificationTask(name, tuple(words.values()), {})
        assert len(set(label_token_ids(task, tokenizer))) == len(words), name
    raw = ClassificationTask("intent_recognition", tuple(LABEL_WORDS["intent_recognition"]), {})
    with pytest.raises(DataError, match="'search_creative_work' and 'search_screening_event' both start"):
        label_token_ids(raw, tokenizer)  # why the table renames them


def test_stratified_split_keeps_the_label_mix() -> None:
    examples = [(f"text {i}", "a" if i % 10 < 7 else "b") for i in range(100)]
    splits = stratified_split("t", examples)
    assert {s: Counter(w for _, w in samples) for s, samples in splits.items()} == {
        "train": {"a": 56, "b": 24},
        "validation": {"a": 7, "b": 3},
        "test": {"a": 7, "b": 3},
    }
    assert sorted(e for samples in splits.values() for e in samples) == sorted(examples)
    for samples in splits.values():
        assert samples == sorted(samples, key=examples.index)  # the shuffled order is kept
    assert stratified_split("t", examples) == splits
    with pytest.raises(DataError, match="task 't' keeps 2 examples: too few to fill its validation split"):
        stratified_split("t", examples[:2])


def test_converted_data_is_deterministic(converted: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    bigbench.write_dataset(FIXTURE, TASKS, tokenizer, tmp_path)
    assert (tmp_path / "tasks.jsonl").read_bytes() == converted.read_bytes()
    rows = [json.loads(line) for line in converted.read_text().splitlines()]
    assert {(r["task"], r["split"]) for r in rows} == {(t, s) for t in TASKS for s in SPLITS}


def test_clients_per_task_deals_each_task_to_k_clients(converted: Path) -> None:
    sports = next(t for t in load_classification_tasks(str(converted)) if t.name == "sports_understanding")
    clients = split_task(sports, 2)
    assert [c.name for c in clients] == ["sports_understanding#0", "sports_understanding#1"]
    assert all(c.label_words == sports.label_words for c in clients)
    for split, samples in sports.splits.items():
        dealt = [s for c in clients for s in c.splits[split]]
        assert sorted(dealt) == sorted(samples)
        assert [len(c.splits[split]) for c in clients] == [len(samples) // 2] * 2
    # 8 train samples, 4 of each label: each client gets 2 of each, in the task's order
    assert [Counter(label for _, label in c.splits["train"]) for c in clients] == [{0: 2, 1: 2}] * 2
    assert sorted(clients[0].splits["train"], key=sports.splits["train"].index) == clients[0].splits["train"]
    intent = next(t for t in load_classification_tasks(str(converted)) if t.name == "intent_recognition")
    assert [c.name for c in split_task(intent, 7)][-1] == "intent_recognition#6"
    assert split_task(sports, 1) == [sports]
    politifact = next(t for t in load_classification_tasks(str(converted)) if t.name == "fact_checker/politifact")
    with pytest.raises(
        DataError, match=r"'fact_checker/politifact' has 2 validation samples: too few for data.clients_per_task = 3"
    ):
        split_task(politifact, 3)


def test_clients_per_task_in_the_run_config(converted: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = DataConfig(source="classification", path=str(converted), seq_len=128, clients_per_task=2)
    clients = load_classification_clients(cfg, tokenizer)
    assert [c.client_id for c in clients] == sorted(f"{t}#{i}" for t in TASKS for i in range(2))
    assert clients[2].label_token_ids == clients[3].label_token_ids  # intent_recognition#0 and #1
    with pytest.raises(ConfigError, match=r"'data.clients_per_task' = 0 is out of range: must be >= 1"):
        RunConfig.from_flat({"data.source": "classification", "data.path": "x.jsonl", "data.clients_per_task": 0})
    with pytest.raises(ConfigError, match="data.clients_per_task = 2 needs data.source = 'classification'"):
        RunConfig.from_flat({"data.clients_per_task": 2})


def test_max_samples_per_client_caps_each_split_by_its_share_with_its_label_mix(
    converted: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    sports = next(t for t in load_classification_tasks(str(converted)) if t.name == "sports_understanding")
    assert {s: len(v) for s, v in sports.splits.items()} == {"train": 8, "validation": 2, "test": 2}
    capped = cap_samples(sports, 6)  # half of each split
    assert {s: len(v) for s, v in capped.splits.items()} == {"train": 4, "validation": 1, "test": 1}
    assert Counter(label for _, label in capped.splits["train"]) == {0: 2, 1: 2}
    for split, samples in capped.splits.items():
        assert sorted(samples, key=sports.splits[split].index) == samples  # file order
    assert cap_samples(sports, 0) == sports and cap_samples(sports, 100) == sports
    assert all(len(v) >= 1 for v in cap_samples(sports, 2).splits.values())
    cfg = DataConfig(source="classification", path=str(converted), seq_len=128, max_samples_per_client=6)
    assert all(len(c.splits["train"].labels) <= 4 for c in load_classification_clients(cfg, tokenizer))


@pytest.mark.e2e
def test_data_stats_of_a_classification_source(converted: Path, tmp_path: Path) -> None:
    settings = ["--set", "data.source='classification'", "--set", f"data.path='{converted}'"]
    settings += [
        "--set",
        "data.seq_len=128",
        "--set",
        "model.name='tiny-random'",
        "--set",
        "data.max_samples_per_client=6",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "elora_fed.cli", "data-stats", *settings], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["clients"] == len(TASKS)
    sports = stats["per_client"]["sports_understanding"]
    assert sports["train"]["samples"] == 4 and sports["train"]["per_label"] == [2, 2] and sports["test"]["samples"] == 1
    assert stats["samples"]["test"] == sum(c["test"]["samples"] for c in stats["per_client"].values())
    assert 0 < sports["test"]["max_tokens"] <= 128
