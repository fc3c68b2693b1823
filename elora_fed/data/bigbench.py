"""Real BIG-bench classification tasks, prepared offline as a multi-task classification file.

BIG-bench's JSON tasks ship inside the PyPI sdist ``bigbench==1.0.0``
(``bigbench/benchmark_tasks/<task>/task.json``, sub-tasks one folder deeper). ``pip
download`` cannot fetch it (building its metadata fails on a direct-URL dependency), so
the archive is found on the simple page of pip's index and checked against a pinned
sha256. Only the chosen tasks' ``task.json`` files are extracted, then converted into the
JSONL + ``<stem>.labels.json`` format that ``elora_fed.data.classification`` loads, with a
fixed split column. This is a set-up step (``elora-fed fetch-data --bigbench``), never
done during a run.

Each kept example is the prompt ``task_prefix + example_input_prefix + input`` (then
classification's ``"\\nAnswer:"``) and one label, mapped to a label word whose first token
differs from the task's other words (``LABEL_WORDS``). Examples without exactly one
target score of 1, or whose prompt is longer than ``MAX_PROMPT_TOKENS`` SmolLM2 tokens,
are dropped and counted; large tasks are cut to ``MAX_EXAMPLES`` after a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import urljoin

from elora_fed.data.classification import PROMPT_SUFFIX
from elora_fed.data.splits import SPLITS
from elora_fed.errors import DataError
from elora_fed.paths import atomic_directory, cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
DEFAULT_INDEX = "https://pypi.org/simple"
TASKS_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MAX_PROMPT_TOKENS = 128  # prompt including the answer suffix: fits data.seq_len = 128 uncut
MAX_EXAMPLES = 2000  # per task, after the shuffle (vitaminc has 54,668, fever 6,612)
HOLDOUT_FRACTION = 0.1  # of each label's examples, for validation and again for test
SEED = 0
JSONL_NAME = "tasks.jsonl"
LABELS_NAME = "tasks.labels.json"  # the sidecar classification.py reads next to tasks.jsonl
STATS_NAME = "tasks.stats.json"

# Each task's BIG-bench labels -> label words, in the label-word order of the sidecar.
# Words are the task's own labels except where two would share a first token.
LABEL_WORDS: dict[str, dict[str, str]] = {
    "epistemic_reasoning": {"entailment": "entailment", "non-entailment": "non-entailment"},
    "fact_checker/fever": {"false": "false", "true": "true"},
    "fact_checker/politifact": {"false": "false", "true": "true"},
    "implicatures": {"no": "no", "yes": "yes"},
    "intent_recognition": {
        "add_to_playlist": "add_to_playlist",
        "book_restaurant": "book_restaurant",
        "get_weather": "get_weather",
        "play_music": "play_music",
        "rate_book": "rate_book",
        "search_creative_work": "creative_work",  # both search_* labels start with " search"
        "search_screening_event": "screening_event",
    },
    "social_support": {"neutral": "neutral", "supportive": "supportive", "unsupportive": "unsupportive"},
    "sports_understanding": {"implausible": "implausible", "plausible": "plausible"},
    "strategyqa": {"No": "No", "Yes": "Yes"},
    "vitaminc_fact_verification": {"False": "False", "Neither": "Neither", "True": "True"},
    "winowhy": {"correct": "correct", "incorrect": "incorrect"},
}
TASKS = tuple(LABEL_WORDS)

Example = tuple[str, str]  # (prompt text, label word)


def default_dir() -> Path:
    return cache_root() / "data" / "bigbench-1.0.0"


def fetch_bigbench(
    dest: Path | None = None,
    archive: Path | None = None,
    tasks: Sequence[str] = TASKS,
    tokenizer: PreTrainedTokenizerBase | None = None,
    sha256: str = SDIST_SHA256,
) -> Path:
    """Prepare ``dest/tasks.jsonl`` (and its sidecars) from the sdist; return its path.

    ``archive`` is a local copy of the sdist; without it the sdist is downloaded from pip's
    index into a temporary file, deleted afterwards. Either is checked against ``sha256``.
    ``dest`` appears complete or not at all; if it is already there, nothing is read.
    """
    check_tasks(tasks)
    dest = dest or default_dir()
    jsonl = dest / JSONL_NAME
    if jsonl.is_file():
        have = sorted(json.loads((dest / STATS_NAME).read_text())["tasks"])
        if have != sorted(tasks):
            raise DataError(
                f"{dest} already holds BIG-bench tasks {have}, not {sorted(tasks)}: remove it or use --dest"
            )
        return jsonl
    if tokenizer is None:
        from elora_fed.model.config import ModelConfig
        from elora_fed.model.models import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bigbench-download-", dir=dest.parent) as tmp:
        if archive is None:
            archive = Path(tmp) / SDIST_NAME
            download(sdist_url(index_url(), sha256), archive)
        check_sha256(archive, sha256)
        with atomic_directory(dest) as out:
            extract_tasks(archive, tasks, out / "benchmark_tasks")
            write_dataset(out / "benchmark_tasks", tasks, tokenizer, out)
    return jsonl


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in LABEL_WORDS]
    if not tasks:
        raise DataError(f"no BIG-bench task chosen: choose from {', '.join(TASKS)}")
    if unknown:
        raise DataError(f"unknown BIG-bench task(s) {unknown}: choose from {', '.join(TASKS)}")


def index_url() -> str:
    """pip's index: ``$PIP_INDEX_URL``, else ``pip config get global.index-url``, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    cmd = [sys.executable, "-m", "pip", "config", "get", "global.index-url"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else DEFAULT_INDEX


def sdist_url(index: str, sha256: str) -> str:
    """The sdist's URL on the index's simple page ``<index>/bigbench/``, whose listed hash must match."""
    page_url = f"{index.rstrip('/')}/bigbench/"
    with _urlopen(page_url) as response:
        page = response.read().decode("utf-8", errors="replace")
    names = []
    for href in re.findall(r'href="([^"]+)"', page):
        url, _, fragment = html.unescape(href).partition("#")
        names.append(url.rsplit("/", 1)[-1])
        if names[-1] == SDIST_NAME:
            listed = fragment.removeprefix("sha256=")
            if fragment.startswith("sha256=") and listed != sha256:
                raise DataError(f"{page_url} lists {SDIST_NAME} with sha256 {listed}, expected {sha256}")
            return urljoin(page_url, url)
    raise DataError(
        f"{page_url} lists no {SDIST_NAME} (it lists: {', '.join(names) or 'nothing'}); the index does not serve "
        f"it: pass a copy with `elora-fed fetch-data --bigbench-archive PATH` (sha256 {sha256})"
    )


def download(url: str, path: Path) -> None:
    """Stream ``url`` into ``path`` in 1 MiB chunks (the sdist is 358 MB)."""
    with _urlopen(url) as response, path.open("wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def check_sha256(path: Path, expected: str) -> None:
    if not path.is_file():
        raise DataError(f"BIG-bench archive not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DataError(
            f"{path} has sha256 {digest.hexdigest()}, expected {expected} ({SDIST_NAME}): corrupted or another file"
        )


def extract_tasks(archive: Path, tasks: Sequence[str], out: Path) -> None:
    """Write ``out/<task>/task.json`` for each task, streaming once through the archive."""
    wanted = {f"{TASKS_ROOT}{task}/task.json": task for task in tasks}
    found = set()
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                task = wanted.get(member.name)
                source = tar.extractfile(member) if task and member.isfile() else None
                if task and source:
                    (out / task).mkdir(parents=True, exist_ok=True)
                    (out / task / "task.json").write_bytes(source.read())
                    found.add(task)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read {archive} as a .tar.gz archive: {e}") from e
    missing = [task for task in tasks if task not in found]
    if missing:
        raise DataError(f"{archive} holds no {TASKS_ROOT}<task>/task.json for task(s) {', '.join(missing)}")


def convert_task(
    name: str, task_json: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Example], dict[str, int]]:
    """The task's usable examples as (prompt text, label word), shuffled and capped, and drop counts."""
    words = LABEL_WORDS[name]
    prefix = str(task_json.get("task_prefix") or "") + str(task_json.get("example_input_prefix") or "")
    examples, malformed = [], 0
    for example in task_json.get("examples", []):
        label = _label_of(example)
        if label not in words:
            malformed += 1
            continue
        examples.append(((prefix + example["input"]).strip(), words[label]))
    lengths = [
        len(ids) for ids in tokenizer([t + PROMPT_SUFFIX for t, _ in examples], add_special_tokens=False)["input_ids"]
    ]
    short = [e for e, n in zip(examples, lengths, strict=True) if n <= MAX_PROMPT_TOKENS]
    random.Random(f"{SEED}:{name}").shuffle(short)
    counts = {
        "examples": len(task_json.get("examples", [])),
        "dropped_malformed": malformed,
        "dropped_too_long": len(examples) - len(short),
        "dropped_over_cap": max(0, len(short) - MAX_EXAMPLES),
    }
    return short[:MAX_EXAMPLES], counts


def stratified_split(name: str, examples: Sequence[Example]) -> dict[str, list[Example]]:
    """Per label: the first 10% to validation, the next 10% to test, the rest to train.

    The examples come shuffled, so this keeps each split's label mix that of the task; a
    label with 3 or more examples gives at least one to validation and to test. Each split
    keeps the shuffled order.
    """
    by_label: dict[str, list[int]] = {}
    for i, (_, word) in enumerate(examples):
        by_label.setdefault(word, []).append(i)
    split_of = ["train"] * len(examples)
    for indices in by_label.values():
        n_hold = max(1, round(len(indices) * HOLDOUT_FRACTION)) if len(indices) >= 3 else 0
        for j, i in enumerate(indices[: 2 * n_hold]):
            split_of[i] = "validation" if j < n_hold else "test"
    splits = {s: [e for e, where in zip(examples, split_of, strict=True) if where == s] for s in SPLITS}
    empty = [s for s, samples in splits.items() if not samples]
    if empty:
        raise DataError(f"BIG-bench task '{name}' keeps {len(examples)} examples: too few to fill its {empty[0]} split")
    return splits


def write_dataset(
    tasks_dir: Path, tasks: Sequence[str], tokenizer: PreTrainedTokenizerBase, out: Path
) -> dict[str, Any]:
    """Convert ``tasks_dir/<task>/task.json`` into ``out/tasks.jsonl``, its labels sidecar and stats."""
    rows, stats = [], {}
    for name in tasks:
        path = tasks_dir / name / "task.json"
        try:
            task_json = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read BIG-bench task '{name}' from {path}: {e}") from e
        examples, counts = convert_task(name, task_json, tokenizer)
        splits = stratified_split(name, examples)
        rows += [{"task": name, "text": t, "label": w, "split": s} for s, samples in splits.items() for t, w in samples]
        majority = Counter(w for _, w in splits["train"]).most_common(1)[0][0]
        test_labels = [w for _, w in splits["test"]]
        stats[name] = {
            **counts,
            "kept": len(examples),
            "label_words": list(LABEL_WORDS[name].values()),
            "splits": {s: _label_counts(samples, LABEL_WORDS[name]) for s, samples in splits.items()},
            "majority_test_accuracy": round(test_labels.count(majority) / len(test_labels), 4),
        }
    report = {
        "source": f"{SDIST_NAME} (sha256 {SDIST_SHA256}), Apache License 2.0",
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_examples": MAX_EXAMPLES,
        "tasks": stats,
    }
    (out / JSONL_NAME).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out / LABELS_NAME).write_text(json.dumps({n: s["label_words"] for n, s in stats.items()}, indent=1))
    (out / STATS_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_stats(report: dict[str, Any]) -> str:
    """One line per task: kept, dropped, split sizes, majority-class test accuracy."""
    lines = [f"{'task':28} {'kept':>5} {'malformed':>9} {'too long':>8} {'capped':>6}  train/val/test  majority"]
    for name, s in report["tasks"].items():
        sizes = "/".join(str(sum(s["splits"][split].values())) for split in SPLITS)
        lines.append(
            f"{name:28} {s['kept']:5} {s['dropped_malformed']:9} {s['dropped_too_long']:8} "
            f"{s['dropped_over_cap']:6}  {sizes:>14}  {s['majority_test_accuracy']:.3f}"
        )
    return "\n".join(lines)


def _label_counts(samples: Sequence[Example], words: dict[str, str]) -> dict[str, int]:
    counts = Counter(word for _, word in samples)
    return {word: counts[word] for word in words.values()}


def _label_of(example: object) -> str | None:
    """The one label scored 1 (the others 0) of an example with a string input; else None."""
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
        return None
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or any(score not in (0, 1) for score in scores.values()):
        return None
    winners = [label for label, score in scores.items() if score == 1]
    return winners[0] if len(winners) == 1 else None


def _urlopen(url: str) -> IO[bytes]:
    try:
        return cast(IO[bytes], urllib.request.urlopen(url, timeout=60))
    except OSError as e:
        raise DataError(f"cannot download {url}: {e}") from e
