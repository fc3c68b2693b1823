"""Tests for multi-task classification data: loading, splitting, label words, tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import PreTrainedTokenizerBase

from elora_fed.data.classification import (
    PROMPT_SUFFIX,
    ClassificationTask,
    load_classification_tasks,
    tasks_from_dataset_dict,
    tokenize_task,
)
from elora_fed.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
JSONL = FIXTURES / "classification.jsonl"
CSV = FIXTURES / "classification.csv"


def _jsonl_rows(task: str) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in JSONL.read_text().splitlines()]
    return [row for row in rows if row["task"] == task]


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(task: str, n: int, labels: tuple[str, ...] = ("no", "yes")) -> list[dict[str, object]]:
    return [{"task": task, "text": f"{task} sentence {i}.", "label": labels[i % len(labels)]} for i in range(n)]


def test_jsonl_tasks_are_sorted_with_sidecar_label_order() -> None:
    tasks = load_classification_tasks(str(JSONL))
    assert [t.name for t in tasks] == ["entailment", "sentiment", "topic"]
    words = {t.name: t.label_words for t in tasks}
    assert words["topic"] == ("sports", "business", "science")  # sidecar order, not sorted
    assert words["sentiment"] == ("no", "yes")
    assert words["entailment"] == ("contradiction", "entailment", "neutral")  # not in sidecar: sorted


def test_labels_index_label_words() -> None:
    topic = next(t for t in load_classification_tasks(str(JSONL)) if t.name == "topic")
    rows = _jsonl_rows("topic")
    samples = [s for split in ("train", "validation", "test") for s in topic.splits[split]]
    assert samples == [(row["text"], topic.label_words.index(row["label"])) for row in rows]
    assert samples[0] == ("The striker scored twice in the final ten minutes.", 0)
    assert samples[1][1] == 1  # business


def test_block_split_is_contiguous_disjoint_and_deterministic() -> None:
    tasks = load_classification_tasks(str(JSONL), val_fraction=0.1, test_fraction=0.2)
    sentiment = next(t for t in tasks if t.name == "sentiment")
    texts = [row["text"] for row in _jsonl_rows("sentiment")]
    split_texts = {split: [text for text, _ in samples] for split, samples in sentiment.splits.items()}
    assert split_texts == {"train": texts[:14], "validation": texts[14:16], "test": texts[16:]}
    assert load_classification_tasks(str(JSONL), val_fraction=0.1, test_fraction=0.2) == tasks


def test_block_split_rejects_a_task_too_small_to_split(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", _rows("big", 10) + _rows("tiny", 2))
    with pytest.raises(DataError, match="client 'tiny' has 2 samples: too few"):
        load_classification_tasks(str(path))


def test_csv_split_column_is_followed() -> None:
    tasks = load_classification_tasks(str(CSV))  # the shared sidecar names only the JSONL's tasks
    assert [t.name for t in tasks] == ["question_type", "spam"]
    spam = tasks[1]
    assert spam.label_words == ("ham", "spam")
    assert [len(spam.splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    assert spam.splits["train"][0] == ("Congratulations, you have won a free cruise! Reply now.", 1)
    question = tasks[0]
    assert question.splits["test"] == [
        ("When, exactly, does spring begin?", question.label_words.index("when")),
        ('Who said "I think, therefore I am"?', question.label_words.index("who")),
    ]


def test_missing_file() -> None:
    with pytest.raises(DataError, match=r"classification data file not found: .*nope\.jsonl"):
        load_classification_tasks("/nonexistent/nope.jsonl")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("task,text,label\n")
    with pytest.raises(DataError, match=r"unsupported classification data file .*data.txt: use a .jsonl or .csv"):
        load_classification_tasks(str(path))


def test_csv_missing_required_column(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("task,text\nt,hello\n")
    with pytest.raises(DataError, match=r"lacks required column\(s\) label"):
        load_classification_tasks(str(path))


def test_jsonl_row_missing_required_column(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [*_rows("t", 4), {"task": "t", "text": "no label here"}])
    with pytest.raises(DataError, match=r"d.jsonl line 5: missing required column\(s\) label"):
        load_classification_tasks(str(path))


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", _rows("t", 3))
    path.write_text(path.read_text() + '{"task": "t", "text": "broken\n')
    with pytest.raises(DataError, match=r"d.jsonl line 4: malformed JSON"):
        load_classification_tasks(str(path))


def test_non_string_value_is_rejected(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"task": "t", "text": "x", "label": 1}])
    with pytest.raises(DataError, match=r"d.jsonl line 1: column 'label' must be a string, got 1"):
        load_classification_tasks(str(path))


def test_empty_file_has_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="has no samples"):
        load_classification_tasks(str(path))


def test_given_split_left_empty_names_the_client(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("task,text,label,split\nt,a,yes,train\nt,b,no,validation\nu,c,no,train\n")
    with pytest.raises(DataError, match="client 't' has no test samples"):
        load_classification_tasks(str(path))


def test_bad_split_value(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("task,text,label,split\nt,a,yes,train\nt,b,no,dev\n")
    with pytest.raises(DataError, match=r"d.csv line 3: split 'dev' is not one of train, validation, test"):
        load_classification_tasks(str(path))


def test_label_not_in_sidecar(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", _rows("t", 5, labels=("no", "yes", "maybe")))
    (tmp_path / "d.labels.json").write_text(json.dumps({"t": ["no", "yes"]}))
    with pytest.raises(DataError, match=r"d.jsonl line 3: label 'maybe' is not a label word of task 't'"):
        load_classification_tasks(str(path))


def test_malformed_sidecar(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", _rows("t", 5))
    (tmp_path / "d.labels.json").write_text(json.dumps({"t": "no,yes"}))
    with pytest.raises(DataError, match="must map each task to a list of label words"):
        load_classification_tasks(str(path))


def _boolq_like(test_labels: list[int]) -> DatasetDict:
    features = Features(
        {"idx": Value("int32"), "question": Value("string"), "label": ClassLabel(names=["False", "True"])}
    )

    def split(prefix: str, labels: list[int]) -> Dataset:
        questions = [f"{prefix} question {i}?" for i in range(len(labels))]
        return Dataset.from_dict(
            {"idx": list(range(len(labels))), "question": questions, "label": labels}, features=features
        )

    return DatasetDict(
        {"train": split("train", [0, 1, 1, 0]), "validation": split("val", [1, 0]), "test": split("test", test_labels)}
    )


def test_dataset_dict_with_labelled_splits_keeps_them() -> None:
    (task,) = tasks_from_dataset_dict("super_glue:boolq", _boolq_like([1, 0]))
    assert task.name == "super_glue:boolq"
    assert task.label_words == ("False", "True")
    train = [("train question 0?", 0), ("train question 1?", 1), ("train question 2?", 1), ("train question 3?", 0)]
    assert task.splits["train"] == train
    assert task.splits["validation"] == [("val question 0?", 1), ("val question 1?", 0)]
    assert task.splits["test"] == [("test question 0?", 1), ("test question 1?", 0)]


def test_dataset_dict_with_unlabelled_test_is_pooled_and_split() -> None:
    (task,) = tasks_from_dataset_dict("boolq", _boolq_like([-1, -1]), val_fraction=0.2, test_fraction=0.2)
    pooled = [(f"train question {i}?", label) for i, label in enumerate([0, 1, 1, 0])]
    pooled += [("val question 0?", 1), ("val question 1?", 0)]
    assert task.splits == {"train": pooled[:4], "validation": pooled[4:5], "test": pooled[5:]}


def test_dataset_dict_prefers_text_column() -> None:
    features = Features({"title": Value("string"), "text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    data = Dataset.from_dict({"title": ["T"] * 3, "text": ["x", "y", "z"], "label": [0, 1, 0]}, features=features)
    (task,) = tasks_from_dataset_dict("d", DatasetDict({"train": data}))
    assert task.splits == {"train": [("x", 0)], "validation": [("y", 1)], "test": [("z", 0)]}


def test_dataset_dict_without_class_label() -> None:
    data = Dataset.from_dict({"text": ["x"], "label": ["a"]})
    with pytest.raises(DataError, match="dataset 'd' has no ClassLabel column"):
        tasks_from_dataset_dict("d", DatasetDict({"train": data}))


def test_hf_source_uses_dataset_name_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, config: str | None) -> DatasetDict:
        calls.append((name, config))
        return _boolq_like([0, 1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (task,) = load_classification_tasks("hf:super_glue:boolq")
    assert calls == [("super_glue", "boolq")]
    assert task.name == "super_glue:boolq"


def test_hf_source_offline_suggests_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, config: str | None) -> DatasetDict:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load dataset 'super_glue:boolq'.*local \.jsonl or \.csv file"):
        load_classification_tasks("hf:super_glue:boolq")


def _task(texts: list[str], label_words: tuple[str, ...] = ("no", "yes")) -> ClassificationTask:
    samples = [(text, i % len(label_words)) for i, text in enumerate(texts)]
    return ClassificationTask("t", label_words, {"train": samples, "validation": samples[:1], "test": samples[:1]})


def test_tokenize_task_prompts_and_label_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    topic = next(t for t in load_classification_tasks(str(JSONL)) if t.name == "topic")
    samples = tokenize_task(topic, tokenizer, max_len=64)
    assert samples.client_id == "topic"
    expected = tuple(tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in topic.label_words)
    assert samples.label_token_ids == expected
    assert len(set(samples.label_token_ids)) == 3
    for split, prompts in samples.splits.items():
        assert prompts.labels == [label for _, label in topic.splits[split]]
        full = [
            tokenizer(text + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"] for text, _ in topic.splits[split]
        ]
        assert prompts.input_ids == full  # short texts are not cut


def test_long_prompt_is_cut_from_the_left_and_ends_with_answer(tokenizer: PreTrainedTokenizerBase) -> None:
    long_text = " ".join(f"word{i}" for i in range(200))
    samples = tokenize_task(_task([long_text, "Short one."]), tokenizer, max_len=16)
    long_ids, short_ids = samples.splits["train"].input_ids
    assert len(long_ids) == 16
    full = tokenizer(long_text + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    assert long_ids == full[-16:]
    assert str(tokenizer.decode(long_ids)).endswith("word199\nAnswer:")
    assert tokenizer.decode(short_ids) == "Short one.\nAnswer:"


def test_max_len_too_small(tokenizer: PreTrainedTokenizerBase) -> None:
    suffix_len = len(tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
    tokenize_task(_task(["a b c"]), tokenizer, max_len=suffix_len + 1)
    with pytest.raises(DataError, match=f"max_len = {suffix_len} is too small.*at least {suffix_len + 1}"):
        tokenize_task(_task(["a b c"]), tokenizer, max_len=suffix_len)


def test_label_words_sharing_a_first_token(tokenizer: PreTrainedTokenizerBase) -> None:
    task = _task(["a", "b", "c"], label_words=("not good", "not bad"))
    with pytest.raises(DataError, match="task 't': label words 'not good' and 'not bad' both start with token"):
        tokenize_task(task, tokenizer, max_len=32)
