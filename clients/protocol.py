"""How sketches travel in Flower messages: the records a client sends and the server reads.

A sketch reply holds one ArrayRecord ``sketch`` (split codes, sample indices, base outputs,
projected gradients, labels) and one ConfigRecord ``sketch_meta`` (the client id and the
settings the sketch was made with, as JSON). Decoding checks every field, so a malformed
reply is a named error rather than a crash later.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from elora_fed.client_sketch import ClientSketch, SketchMetadata
from elora_fed.errors import DataError

SKETCH_ARRAYS = ("split", "sample_index", "outputs", "features", "labels")


def sketch_to_record(sketch: ClientSketch) -> RecordDict:
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(getattr(sketch, name))) for name in SKETCH_ARRAYS})
    meta = ConfigRecord({"client_id": sketch.client_id, "metadata": json.dumps(dataclasses.asdict(sketch.metadata))})
    return RecordDict({"sketch": arrays, "sketch_meta": meta})


def sketch_from_record(content: RecordDict) -> ClientSketch:
    """The sketch in a reply; DataError naming what is missing or inconsistent."""
    try:
        arrays = content.array_records["sketch"]
        meta = content.config_records["sketch_meta"]
        values = {name: arrays[name].numpy() for name in SKETCH_ARRAYS}
        client_id = str(meta["client_id"])
        metadata = SketchMetadata(**json.loads(str(meta["metadata"])))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"malformed sketch reply: {type(e).__name__}: {e}") from e
    n = len(values["outputs"])
    features = values["features"]
    if features.ndim != 2 or features.shape != (n, metadata.dim) or any(len(values[k]) != n for k in SKETCH_ARRAYS):
        raise DataError(
            f"malformed sketch reply from '{client_id}': {n} outputs, features {features.shape}, d = {metadata.dim}"
        )
    if not np.isfinite(values["outputs"]).all() or not np.isfinite(features).all():
        raise DataError(f"malformed sketch reply from '{client_id}': non-finite values")
    return ClientSketch(client_id=client_id, metadata=metadata, **values)
