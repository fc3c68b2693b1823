"""One client's sketch: every sample's base output and projected gradient, stored compactly.

Each row carries its own (split, sample index) next to b and the projected gradient, and
the file carries the client id and what produced it (model, adapter seed, projection seed,
d). Rows are always returned sorted by (split, sample index), and a folder of sketches is
always read sorted by client id from the files' contents, so nothing depends on the order
in which batches ran or files are listed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from elora_fed.config import RunConfig
from elora_fed.data.classification import ClassificationSamples
from elora_fed.data.lm_samples import LMSamples
from elora_fed.data.splits import SPLITS
from elora_fed.errors import DataError
from elora_fed.model.batches import Batch, client_batches
from elora_fed.sketch.gradients import gradient_dim, sketch_batches
from elora_fed.sketch.projection import JLProjector


@dataclass(frozen=True)
class SketchMetadata:
    """What a sketch depends on: features from different settings must never be mixed."""

    model: str
    precision: str
    adapter_rank: int
    adapter_target_modules: str
    adapter_seed: int
    projection: str
    projection_seed: int
    dim: int
    gradient_dim: int
    task: str  # "lm" or "classification"


@dataclass(frozen=True)
class ClientSketch:
    """Rows of one client: ``split`` codes index ``SPLITS``; ``labels`` is -1 for LM samples."""

    client_id: str
    split: np.ndarray
    sample_index: np.ndarray
    outputs: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    metadata: SketchMetadata

    def __post_init__(self) -> None:
        order = np.lexsort((self.sample_index, self.split))
        for name in ("split", "sample_index", "outputs", "features", "labels"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name)[order]))

    def rows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(b, features) of one split, by sample index."""
        mask = self.split == SPLITS.index(split)
        return self.outputs[mask], self.features[mask]

    def save(self, folder: Path) -> Path:
        """Write ``<folder>/<client>.npz`` atomically and return its path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_file_stem(self.client_id)}.npz"
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            np.savez(
                f,
                split=self.split,
                sample_index=self.sample_index,
                outputs=self.outputs,
                features=self.features,
                labels=self.labels,
                header=np.frombuffer(
                    json.dumps({"client_id": self.client_id, **dataclasses.asdict(self.metadata)}).encode(),
                    dtype=np.uint8,
                ),
            )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> ClientSketch:
        try:
            with np.load(path) as data:
                header = json.loads(data["header"].tobytes())
                arrays = {k: data[k] for k in ("split", "sample_index", "outputs", "features", "labels")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"corrupt sketch file {path}: {e}") from e
        client_id = header.pop("client_id")
        return cls(client_id=client_id, metadata=SketchMetadata(**header), **arrays)


def load_sketches(folder: Path) -> list[ClientSketch]:
    """Every sketch in ``folder``, sorted by client id; they must share one metadata."""
    sketches = sorted((ClientSketch.load(p) for p in folder.glob("*.npz")), key=lambda s: s.client_id)
    if not sketches:
        raise DataError(f"no client sketches (*.npz) in {folder}")
    first = sketches[0]
    for other in sketches[1:]:
        if other.metadata != first.metadata:
            raise DataError(
                f"sketches in {folder} were made with different settings: {first.client_id} has "
                f"{first.metadata}, {other.client_id} has {other.metadata}"
            )
    return sketches


def sketch_setup(model: nn.Module, config: RunConfig) -> tuple[JLProjector, SketchMetadata]:
    """The projector and the metadata that a run's config defines for an adapted model.

    Every client and the server derive them from the same config, so only seeds travel.
    """
    sk = config.sketch
    projector = JLProjector(gradient_dim(model), sk.dim, sk.seed, sk.projection, sk.block_rows)
    metadata = SketchMetadata(
        model=config.model.name,
        precision=config.model.precision,
        adapter_rank=config.adapter.rank,
        adapter_target_modules=config.adapter.target_modules,
        adapter_seed=config.adapter.seed,
        projection=sk.projection,
        projection_seed=sk.seed,
        dim=sk.dim,
        gradient_dim=projector.input_dim,
        task="classification" if config.data.source == "classification" else "lm",
    )
    return projector, metadata


def sketch_client(
    model: nn.Module,
    samples: LMSamples | ClassificationSamples,
    projector: JLProjector,
    metadata: SketchMetadata,
    batch_size: int,
    buffer_mb: float,
    splits: Sequence[str] = ("train", "validation"),
    pad_token_id: int = 0,
) -> ClientSketch:
    """Sketch the given splits of one client (LM samples or classification prompts)."""
    codes: list[int] = []
    indices: list[int] = []
    labels: list[int] = []
    batches: list[Batch] = []
    for split in splits:
        for start, batch in client_batches(samples, split, batch_size, pad_token_id):
            codes.extend([SPLITS.index(split)] * len(batch))
            indices.extend(range(start, start + len(batch)))
            labels.extend([-1] * len(batch) if batch.labels is None else batch.labels.tolist())
            batches.append(batch)
    if not batches:
        raise DataError(f"client '{samples.client_id}' has no samples in splits {list(splits)}")
    sketch = sketch_batches(model, batches, projector, buffer_mb)
    return ClientSketch(
        client_id=samples.client_id,
        split=np.asarray(codes, dtype=np.int8),
        sample_index=np.asarray(indices, dtype=np.int32),
        outputs=sketch.outputs.numpy().astype(np.float32),
        features=sketch.features.numpy().astype(np.float32),
        labels=np.asarray(labels, dtype=np.int32),
        metadata=metadata,
    )


def _file_stem(client_id: str) -> str:
    """A portable file name for a client id, unique even where sanitizing collides."""
    digest = hashlib.sha256(client_id.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', client_id)[:80]}-{digest}"
