"""Multi-task text classification data: one task per client, answered with a label word.

EnsembleLoRA's second setting trains one adapter per task of a SuperGLUE-style benchmark.
Here each client holds one task. A sample is the prompt ``"{text}\\nAnswer:"`` and the index
of its label word; a causal LM classifies it by comparing the next-token logits of the
label words' first tokens, so those first tokens must differ.

Tasks come from a local JSONL or CSV file with ``task``, ``text``, ``label`` (the label
word) and optional ``split`` columns, with an optional ``<stem>.labels.json`` sidecar
fixing each task's label word order; or from a ``datasets`` name, ``hf:NAME[:CONFIG]``,
which needs a reachable hub or a filled HF cache.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from elora_fed.data.splits import SPLITS, split_contiguous
from elora_fed.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

REQUIRED_COLUMNS = ("task", "text", "label")
PROMPT_SUFFIX = "\nAnswer:"
HF_PREFIX = "hf:"

Samples = list[tuple[str, int]]


@dataclass(frozen=True)
class ClassificationTask:
    """One client's task: its label words and (text, label index) samples per split."""

    name: str
    label_words: tuple[str, ...]
    splits: dict[str, Samples]


@dataclass(frozen=True)
class LabelledPrompts:
    """Tokenized prompts of one split and the label index of each."""

    input_ids: list[list[int]]
    labels: list[int]


@dataclass(frozen=True)
class ClassificationSamples:
    """One client's tokenized task: ``label_token_ids[i]`` is the token that answers label ``i``."""

    client_id: str
    label_token_ids: tuple[int, ...]
    splits: dict[str, LabelledPrompts]


@dataclass(frozen=True)
class _Row:
    where: str  # "data.jsonl line 3", for error messages
    task: str
    text: str
    label: str
    split: str | None


def load_classification_tasks(
    source: str, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> list[ClassificationTask]:
    """Load the tasks of a local ``.jsonl``/``.csv`` file or of ``hf:NAME[:CONFIG]``, sorted by name.

    A task's label words are listed in ``<stem>.labels.json`` next to the file, if it names
    the task (it may also name tasks of other files sharing the stem); otherwise they are the
    task's distinct labels, sorted. Without a ``split`` column each task is cut, in file
    order, into contiguous train, validation and test blocks (see ``split_contiguous``).
    """
    if source.startswith(HF_PREFIX):
        return _load_hf(source.removeprefix(HF_PREFIX), val_fraction, test_fraction)
    path = Path(source).expanduser()
    if not path.is_file():
        hint = " (set it up with `elora-fed fetch-data --bigbench`)" if "bigbench" in str(path) else ""
        raise DataError(f"classification data file not found: {path}{hint}")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported classification data file {path}: use a .jsonl or .csv file, or hf:NAME[:CONFIG]")
    try:
        rows = reader(path)
    except UnicodeDecodeError as e:
        raise DataError(f"classification data file {path} is not UTF-8 text: {e}") from e
    if not rows:
        raise DataError(f"classification data file {path} has no samples")
    sidecar = path.with_name(f"{path.stem}.labels.json")
    label_words = _read_label_words(sidecar) if sidecar.is_file() else {}
    return _tasks_from_rows(rows, label_words, val_fraction, test_fraction)


def tasks_from_dataset_dict(
    name: str, dataset_dict: DatasetDict, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> list[ClassificationTask]:
    """Turn a ``datasets.DatasetDict`` into one task named ``name``.

    The text is column ``text`` if present, else the first string column; the label is the
    first ``ClassLabel`` column, whose names are the label words. Unlabelled rows (label
    -1, as in GLUE test sets) are dropped. The dataset's train/validation/test splits are
    kept if all three have labelled rows; otherwise their rows are pooled and cut by
    ``split_contiguous``.
    """
    from datasets import ClassLabel, Value

    if not dataset_dict:
        raise DataError(f"client '{name}' has no samples: the dataset has no splits")
    features = next(iter(dataset_dict.values())).features
    label_column = next((c for c, f in features.items() if isinstance(f, ClassLabel)), None)
    if label_column is None:
        raise DataError(f"dataset '{name}' has no ClassLabel column to use as the label")
    strings = [c for c, f in features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]
    text_column = "text" if "text" in features else next(iter(strings), None)
    if text_column is None:
        raise DataError(f"dataset '{name}' has no string column to use as the text")
    given = {s: _labelled(dataset_dict[s], text_column, label_column) for s in SPLITS if s in dataset_dict}
    if all(given.get(s) for s in SPLITS):
        splits = given
    else:
        splits = split_contiguous(name, [sample for s in given.values() for sample in s], val_fraction, test_fraction)
    return [ClassificationTask(name, tuple(features[label_column].names), splits)]


def split_task(task: ClassificationTask, num_clients: int) -> list[ClassificationTask]:
    """Deal one task's samples to ``num_clients`` clients ``name#0`` .. ``name#K-1``, keeping its label words.

    Lets the same benchmark run as a larger federation (``data.clients_per_task``). Each
    split is dealt round-robin in label order, so every client gets the task's label mix
    (split sizes differ by at most one), in file order. With one client the task stays as it is.
    """
    if num_clients == 1:
        return [task]
    dealt: list[dict[str, Samples]] = [{split: [] for split in task.splits} for _ in range(num_clients)]
    for split, samples in task.splits.items():
        if len(samples) < num_clients:
            raise DataError(
                f"task '{task.name}' has {len(samples)} {split} samples: too few for data.clients_per_task = "
                f"{num_clients} (every client needs at least one train, validation and test sample)"
            )
        by_label = sorted(range(len(samples)), key=lambda i: samples[i][1])  # stable: file order within a label
        client_of = {i: rank % num_clients for rank, i in enumerate(by_label)}
        for i, sample in enumerate(samples):
            dealt[client_of[i]][split].append(sample)
    return [ClassificationTask(f"{task.name}#{i}", task.label_words, splits) for i, splits in enumerate(dealt)]


def cap_samples(task: ClassificationTask, limit: int) -> ClassificationTask:
    """Keep at most about ``limit`` samples in all, each split its share, with its label mix.

    ``data.max_samples_per_client`` for classification. A split of n of the task's N samples
    keeps floor(limit * n / N) of them (at least one). Within a split each label keeps its
    share, its samples taken in file order: samples rank by their position within their
    label, (rank + 1/2) / label count, and the lowest ranks stay, in file order. ``limit =
    0`` or a smaller task: unchanged.
    """
    total = sum(len(samples) for samples in task.splits.values())
    if not limit or total <= limit:
        return task
    return ClassificationTask(
        task.name,
        task.label_words,
        {
            split: _stratified_head(samples, max(1, limit * len(samples) // total))
            for split, samples in task.splits.items()
        },
    )


def _stratified_head(samples: Samples, keep: int) -> Samples:
    totals = Counter(label for _, label in samples)
    seen: Counter[int] = Counter()
    ranks = []
    for _, label in samples:
        ranks.append((seen[label] + 0.5) / totals[label])
        seen[label] += 1
    kept = sorted(sorted(range(len(samples)), key=lambda i: ranks[i])[:keep])
    return [samples[i] for i in kept]


def tokenize_task(task: ClassificationTask, tokenizer: PreTrainedTokenizerBase, max_len: int) -> ClassificationSamples:
    """Tokenize every prompt, cutting long texts from the left so each ends with ``Answer:``."""
    suffix_len = len(tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
    if max_len < suffix_len + 1:
        raise DataError(
            f"max_len = {max_len} is too small for a classification prompt: {PROMPT_SUFFIX!r} takes "
            f"{suffix_len} tokens, so max_len must be at least {suffix_len + 1}"
        )
    splits = {split: _tokenize_samples(samples, tokenizer, max_len) for split, samples in task.splits.items()}
    return ClassificationSamples(task.name, label_token_ids(task, tokenizer), splits)


def label_token_ids(task: ClassificationTask, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The first token of ``" " + word`` for each label word; they must all differ."""
    word_of: dict[int, str] = {}
    for word in task.label_words:
        token = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
        if token in word_of:
            raise DataError(
                f"task '{task.name}': label words '{word_of[token]}' and '{word}' both start with token {token} "
                f"({tokenizer.decode([token])!r}); choose label words whose first tokens differ"
            )
        word_of[token] = word
    return tuple(word_of)


def _tokenize_samples(samples: Samples, tokenizer: PreTrainedTokenizerBase, max_len: int) -> LabelledPrompts:
    prompts = [f"{text}{PROMPT_SUFFIX}" for text, _ in samples]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return LabelledPrompts([list(ids[-max_len:]) for ids in encoded], [label for _, label in samples])


def _read_jsonl(path: Path) -> list[_Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with {', '.join(REQUIRED_COLUMNS)}")
            rows.append(_row(record, where))
    return rows


def _read_csv(path: Path) -> list[_Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path} lacks required column(s) {', '.join(missing)}: the header must name "
                f"{', '.join(REQUIRED_COLUMNS)} (and optionally split)"
            )
        return [_row(record, f"{path} line {reader.line_num}") for record in reader]


def _row(record: Mapping[str, object], where: str) -> _Row:
    missing = [c for c in REQUIRED_COLUMNS if c not in record]
    if missing:
        raise DataError(f"{where}: missing required column(s) {', '.join(missing)}")
    for column in (*REQUIRED_COLUMNS, "split"):
        if column in record and not isinstance(record[column], str):
            raise DataError(f"{where}: column '{column}' must be a string, got {record[column]!r}")
    task, text, label = (str(record[c]) for c in REQUIRED_COLUMNS)
    if not task.strip() or not label.strip():
        raise DataError(f"{where}: empty task or label")
    return _Row(where, task, text, label, str(record["split"]) if "split" in record else None)


def _read_label_words(path: Path) -> dict[str, tuple[str, ...]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed labels file {path}: {e}") from e
    if not isinstance(data, dict) or not all(_is_word_list(words) for words in data.values()):
        raise DataError(
            f'labels file {path} must map each task to a list of label words, like {{"task": ["no", "yes"]}}'
        )
    for task, words in data.items():
        if len(set(words)) != len(words):
            raise DataError(f"labels file {path}: task '{task}' lists a label word twice: {words}")
    return {task: tuple(words) for task, words in data.items()}


def _is_word_list(words: object) -> bool:
    return isinstance(words, list) and bool(words) and all(isinstance(w, str) and w.strip() for w in words)


def _tasks_from_rows(
    rows: list[_Row],
    label_words: dict[str, tuple[str, ...]],
    val_fraction: float,
    test_fraction: float,
) -> list[ClassificationTask]:
    by_task: dict[str, list[_Row]] = {}
    for row in rows:
        by_task.setdefault(row.task, []).append(row)
    has_split = any(row.split is not None for row in rows)
    tasks = []
    for name in sorted(by_task):
        task_rows = by_task[name]
        words = label_words.get(name) or tuple(sorted({row.label for row in task_rows}))
        samples = [(row.text, _label_index(row, words)) for row in task_rows]
        if has_split:
            splits = _given_splits(name, task_rows, samples)
        else:
            splits = split_contiguous(name, samples, val_fraction, test_fraction)
        tasks.append(ClassificationTask(name, words, splits))
    return tasks


def _label_index(row: _Row, words: tuple[str, ...]) -> int:
    if row.label not in words:
        raise DataError(f"{row.where}: label '{row.label}' is not a label word of task '{row.task}': {list(words)}")
    return words.index(row.label)


def _given_splits(name: str, rows: list[_Row], samples: Samples) -> dict[str, Samples]:
    splits: dict[str, Samples] = {s: [] for s in SPLITS}
    for row, sample in zip(rows, samples, strict=True):
        if row.split not in splits:
            raise DataError(
                f"{row.where}: split {row.split!r} is not one of {', '.join(SPLITS)} (give every row a split, or none)"
            )
        splits[row.split].append(sample)
    for split, split_samples in splits.items():
        if not split_samples:
            raise DataError(f"client '{name}' has no {split} samples")
    return splits


def _labelled(dataset: Dataset, text_column: str, label_column: str) -> Samples:
    return [
        (text, label) for text, label in zip(dataset[text_column], dataset[label_column], strict=True) if label >= 0
    ]


def _load_hf(spec: str, val_fraction: float, test_fraction: float) -> list[ClassificationTask]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        dataset_dict = datasets.load_dataset(name, config or None)
    except Exception as e:  # datasets raises many types when the hub is unreachable
        raise DataError(
            f"cannot load dataset '{spec}' ({type(e).__name__}: {e}); it needs a reachable hub or a filled HF "
            "cache. Offline, export it to a local .jsonl or .csv file with task, text and label columns "
            "and set data.path to that file"
        ) from e
    return tasks_from_dataset_dict(spec, dataset_dict, val_fraction, test_fraction)
