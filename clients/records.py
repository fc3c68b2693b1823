"""Model objects as message records, and back: adapters and ensembles, sketches, private statistics.

The layout of each record is in ``clients.protocol``. Decoding checks every field, so a
malformed reply is a named ``DataError``, not a crash later.

An adapter travels as one Array (``ADAPTER_ARRAY``): its tensors flattened in key order.
Flower sends every Array as its own objects, one request per object per hop (ServerApp,
SuperLink, SuperNode, ClientApp); SmolLM2's q/v adapter is 120 tensors, whose transfer
took most of a deployed message's overhead (``experiments/deployment_overhead.py``). Both
ends know the layout: the server from theta* (the one adapter sent key by key), a client
from its own model. Element-wise strategies (FedAvg, FedProx, FedAdam, ...) aggregate the
flat vector exactly as they would aggregate its pieces.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from elora_fed.ensemble.outputs import AdapterState, GroupAdapters
from elora_fed.errors import DataError
from elora_fed.sketch.client_sketch import ClientSketch, SketchMetadata
from elora_fed.surrogate.statistics import ClientStatistics, statistics_arrays, statistics_from_arrays

_MEMBER = re.compile(r"group\.(\d+)\.(base|boost\.(\d+))")


ADAPTER_ARRAY = "adapter"
"""The one Array of an adapter's record: its tensors, flattened in sorted key order."""


def flat_adapter(state: AdapterState) -> np.ndarray:
    """``state``'s tensors flattened in sorted key order, as one array; ValueError if their dtypes differ."""
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(
            f"an adapter packs into one array only if its tensors share a dtype, got {sorted(map(str, dtypes))}"
        )
    return torch.cat([state[k].detach().reshape(-1) for k in sorted(state)]).cpu().numpy()


def adapter_record(state: AdapterState) -> ArrayRecord:
    """``state`` as one flat Array (``ADAPTER_ARRAY``): what travels in place of its tensors."""
    return ArrayRecord({ADAPTER_ARRAY: Array(flat_adapter(state))})


def adapter_from(record: ArrayRecord, like: AdapterState, name: str = "adapter") -> AdapterState:
    """The adapter in ``record`` (``adapter_record``), laid out and typed as ``like``; DataError naming a mismatch."""
    if list(record.keys()) != [ADAPTER_ARRAY]:
        raise DataError(f"malformed {name}: arrays {sorted(record.keys())[:3]}, expected one array '{ADAPTER_ARRAY}'")
    try:
        flat = torch.from_numpy(record[ADAPTER_ARRAY].numpy().copy())
    except Exception as e:  # Flower and numpy raise plain exceptions for undecodable arrays
        raise DataError(f"malformed {name}: {type(e).__name__}: {e}") from e
    size = sum(t.numel() for t in like.values())
    if flat.ndim != 1 or flat.numel() != size or not flat.is_floating_point():
        raise DataError(
            f"malformed {name}: {tuple(flat.shape)} {flat.dtype}, expected ({size},) floats (the receiver's adapter layout)"
        )
    flat = flat.to(next(iter(like.values())).dtype)  # e.g. FedAdam aggregates in float64
    state, offset = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        state[k] = flat[offset : offset + n].reshape(like[k].shape).clone()  # own storage: safetensors saves it
        offset += n
    return state


def ensemble_records(groups: Mapping[int, GroupAdapters]) -> dict[str, ArrayRecord]:
    """The ArrayRecords that carry groups' adapters: ``group.G.base`` and ``group.G.boost.T``."""
    records = {}
    for g, group in groups.items():
        records[f"group.{g}.base"] = adapter_record(group.base)
        for t, boost in enumerate(group.boosts):
            records[f"group.{g}.boost.{t}"] = adapter_record(boost)
    return records


def ensemble_from(content: RecordDict, like: AdapterState) -> dict[int, GroupAdapters]:
    """The groups' adapters in a request, by group id, laid out as ``like``; DataError if a boost has no base."""
    bases: dict[int, AdapterState] = {}
    boosts: dict[int, dict[int, AdapterState]] = {}
    for name, record in content.array_records.items():
        match = _MEMBER.fullmatch(name)
        if match is None:
            continue
        g = int(match.group(1))
        state = adapter_from(record, like, f"adapter '{name}'")
        if match.group(3) is None:
            bases[g] = state
        else:
            boosts.setdefault(g, {})[int(match.group(3))] = state
    if set(boosts) - set(bases):
        raise DataError(f"boosting adapters for groups {sorted(set(boosts) - set(bases))} without their base adapter")
    return {
        g: GroupAdapters(bases[g], [boosts.get(g, {})[t] for t in sorted(boosts.get(g, {}))]) for g in sorted(bases)
    }


SKETCH_ARRAYS = ("split", "sample_index", "outputs", "features", "labels")


def sketch_to_record(sketch: ClientSketch) -> RecordDict:
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(getattr(sketch, name))) for name in SKETCH_ARRAYS})
    meta = ConfigRecord({"client_id": sketch.client_id, "metadata": json.dumps(dataclasses.asdict(sketch.metadata))})
    return RecordDict({"sketch": arrays, "sketch_meta": meta})


def statistics_to_record(client_id: str, stats: ClientStatistics) -> RecordDict:
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in statistics_arrays(stats).items()})
    return RecordDict({"statistics": arrays, "sketch_meta": ConfigRecord({"client_id": client_id})})


def statistics_from_record(content: RecordDict, dim: int) -> tuple[str, ClientStatistics]:
    """A private-mode reply: the client id and its statistics; DataError naming what is malformed."""
    try:
        client_id = str(content.config_records["sketch_meta"]["client_id"])
        arrays = {k: v.numpy() for k, v in content.array_records["statistics"].items()}
    except Exception as e:  # Flower and numpy raise plain exceptions (ValueError, EOFError, ...) for bad arrays
        raise DataError(f"malformed statistics reply: {type(e).__name__}: {e}") from e
    return client_id, statistics_from_arrays(arrays, dim)


def sketch_from_record(content: RecordDict) -> ClientSketch:
    """The sketch in a reply; DataError naming what is missing or inconsistent."""
    try:
        arrays = content.array_records["sketch"]
        meta = content.config_records["sketch_meta"]
        values = {name: arrays[name].numpy() for name in SKETCH_ARRAYS}
        client_id = str(meta["client_id"])
        metadata = SketchMetadata(**json.loads(str(meta["metadata"])))
    except Exception as e:  # Flower and numpy raise plain exceptions (ValueError, EOFError, ...) for bad arrays
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


def release_to_record(client_id: str, release: ClientSketch | ClientStatistics) -> RecordDict:
    """A sketch-phase reply carrying an affinity mode's release (``elora_fed.surrogate.affinity_modes``)."""
    if isinstance(release, ClientSketch):
        return sketch_to_record(release)
    return statistics_to_record(client_id, release)


def release_from_record(content: RecordDict, dim: int) -> tuple[str, ClientSketch | ClientStatistics]:
    """The client id and release in a sketch-phase reply, a sketch or statistics; DataError naming what is malformed."""
    if "statistics" in content.array_records:
        return statistics_from_record(content, dim)
    sketch = sketch_from_record(content)
    return sketch.client_id, sketch
