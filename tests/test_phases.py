"""The phase protocol in process: phases driven by hand-made replies, and whole runs on ``InProcessGrid``.

No Ray and no subprocess: a phase is a generator of requests (``strategies.phase``), so a
test can answer it directly, and ``InProcessGrid`` runs the real ClientApp on the tiny
random Llama in this process (seconds per run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from elora_fed.accounting import ModelSize
from elora_fed.config import RunConfig
from elora_fed.errors import ConfigError
from elora_fed.sketch.client_sketch import load_sketches
from strategies.evaluation import WeightsPhase
from strategies.federation import Federation
from strategies.in_process import InProcessGrid, act_as_server
from strategies.ledger import Ledger
from strategies.messaging import Exchange
from strategies.phase import Request
from strategies.pipeline import run_pipeline
from strategies.run_state import RunState

TINY = {
    "model.name": "tiny-random",
    "data.num_clients": 4,
    "data.seq_len": 16,
    "data.max_samples_per_client": 12,
    "sketch.dim": 32,
    "affinity.num_subsets": 20,
    "affinity.subset_size": 2,
    "clustering.num_groups": 2,
    "train.rounds": 3,
    "train.local_steps": 2,
    "train.lr": 0.01,
    "boost.steps": 1,
}


def rows(run_dir: Path) -> list[dict]:
    """The per-client rows of a run's report."""
    return json.loads((run_dir / "report.json").read_text())["clients"]


def test_weights_phase_asks_every_client_and_a_client_that_fails_keeps_its_own_group(tmp_path):
    act_as_server()
    config = RunConfig.from_flat({"run_dir": str(tmp_path)})
    run = RunState(config)
    run.info.update(client_ids=["a", "b", "c"], labels=[0, 1, 1])
    adapter = {"layer.lora_B.weight": torch.zeros(2, 2)}
    run.snapshot.adapters.update({"group-0": adapter, "group-1": adapter})
    fed = Federation(None, config, {"a": 11, "b": 12, "c": 13}, {}, adapter, ModelSize(1, 1, 1, 1), Ledger({}))  # type: ignore[arg-type]

    steps = WeightsPhase(run, fed).steps()
    request = next(steps)
    assert isinstance(request, Request) and request.retries == config.federation.retries
    assert sorted(m.metadata.dst_node_id for m in request.messages) == [11, 12, 13]
    assert {m.metadata.message_type for m in request.messages} == {"evaluate"}
    sent = request.messages[0].content.config_records["config"]
    assert sent["split"] == "validation" and sent["fit-weights"] and list(sent["groups"]) == ["0", "1"]

    def reply(message: Message, weights: list[float]) -> Message:
        metrics = MetricRecord({"loss": 1.0, "num-examples": 3, "weights": weights})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    by_node = {m.metadata.dst_node_id: m for m in request.messages}
    replies = [reply(by_node[11], [0.25, 0.75]), reply(by_node[12], [0.5, 0.5])]  # node 13 failed
    result = Exchange("ensemble weights", replies, ["node 13: error"], [13], 3, 0.0, {}, {})
    with pytest.raises(StopIteration):
        steps.send(result)
    assert run.info["weights"] == {"a": [0.25, 0.75], "b": [0.5, 0.5], "c": [0.0, 1.0]}
    written = json.loads((run.dir / "ensemble_weights.json").read_text())
    assert written == {"groups": [0, 1], "weights": run.info["weights"]}


class Interrupted(Exception):
    """Raised by ``StopAfter`` in place of a killed server."""


class StopAfter(InProcessGrid):
    """An in-process grid that fails the server once ``label`` has been asked ``times`` times."""

    def __init__(self, num_nodes: int, message_type: str, times: int) -> None:
        super().__init__(num_nodes)
        self.message_type, self.left = message_type, times

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if messages and messages[0].metadata.message_type == self.message_type:
            if self.left == 0:
                raise Interrupted
            self.left -= 1
        return super().push_messages(messages)


def test_a_run_stopped_inside_training_resumes_in_process_to_the_uninterrupted_report(tmp_path):
    config = RunConfig.from_flat({**TINY, "run_dir": str(tmp_path / "whole")})
    whole = run_pipeline(InProcessGrid(4), config)

    stopped = RunConfig.from_flat({**TINY, "run_dir": str(tmp_path / "stopped")})
    with pytest.raises(Interrupted):
        run_pipeline(StopAfter(4, "train", times=2), stopped)  # after round 2 of 3
    (run_dir,) = (tmp_path / "stopped").iterdir()
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())["info"]
    assert state["train_round"] == 2 and "train" not in state["done"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"

    resumed = run_pipeline(InProcessGrid(4), RunConfig.from_flat({"resume": str(run_dir)}))
    assert resumed == run_dir
    for got, want in zip(rows(resumed), rows(whole), strict=True):
        assert got["client_id"] == want["client_id"] and got["group"] == want["group"]
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-6)
        assert got["weights"] == pytest.approx(want["weights"], rel=1e-5, abs=1e-7)
    phases = [json.loads(line)["phase"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert phases.count("train") == 3  # round 3 once, rounds 1-2 not logged twice


UNIFORM_WEIGHTS = '''
from elora_fed.run_dir import write_json


class UniformWeights:
    """Every group weighs the same for every client: no weights are learned."""

    def __init__(self, run, fed):
        self.run, self.fed = run, fed

    def steps(self):
        groups = self.run.groups()
        self.run.info["weights"] = {c: [1 / len(groups)] * len(groups) for c in self.fed.client_ids}
        write_json(self.run.dir / "ensemble_weights.json", {"weights": self.run.info["weights"]})
        yield from ()
'''


def test_a_phase_slot_takes_a_users_class_from_a_file(tmp_path):
    phase_file = tmp_path / "uniform.py"
    phase_file.write_text(UNIFORM_WEIGHTS)
    settings = {**TINY, "boost.steps": 0, "run_dir": str(tmp_path / "runs")}
    config = RunConfig.from_flat({**settings, "strategies.weights": f"{phase_file}:UniformWeights"})
    run_dir = run_pipeline(InProcessGrid(4), config)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_groups"] == 2
    for row in report["clients"]:
        assert row["weights"] == {"0": 0.5, "1": 0.5}
    phases = [json.loads(line)["phase"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "weights" not in phases  # no evaluation exchange: the user's phase learned nothing
    assert report["seconds"]["weights"] >= 0 and report["phase_order"][4] == "weights"


def test_the_worked_reassign_phase_moves_clients_to_their_best_group_and_retrains(tmp_path):
    settings = {**TINY, "boost.steps": 0, "run_dir": str(tmp_path / "runs")}
    train = "experiments/custom_phase.py:ReassignAndRetrain"
    run_dir = run_pipeline(InProcessGrid(4), RunConfig.from_flat({**settings, "strategies.train": train}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records]
    (reassign,) = [r for r in records if r["phase"] == "reassign"]
    moves = json.loads((run_dir / "reassigned_groups.json").read_text())
    assert moves["moved"] == reassign["moved"] == sum(moves["before"][c] != moves["after"][c] for c in moves["before"])
    for client, losses in moves["validation_group_loss"].items():  # every client went to its best group
        best = min(losses, key=losses.get)
        assert moves["after"][client] == sorted(
            {min(v, key=v.get) for v in moves["validation_group_loss"].values()}
        ).index(best)
    # At this seed two clients move, so the groups are retrained; the report's groups are the new ones.
    assert moves["moved"] > 0 and phases.count("train") == 2 * TINY["train.rounds"]
    report = json.loads((run_dir / "report.json").read_text())
    assert {r["client_id"]: r["group"] for r in report["clients"]} == moves["after"]
    assert report["num_groups"] == reassign["groups"] == len(set(moves["after"].values()))


def test_a_users_affinity_mode_releases_its_own_data_and_matches_the_baseline_it_compresses(tmp_path):
    settings = {**TINY, "boost.steps": 1, "run_dir": str(tmp_path / "runs")}
    cosine = run_pipeline(InProcessGrid(4), RunConfig.from_flat({**settings, "affinity.mode": "gradient-cosine"}))
    mode = "experiments/custom_affinity_mode.py:MeanGradientMode"
    mean = run_pipeline(InProcessGrid(4), RunConfig.from_flat({**settings, "affinity.mode": mode}))
    released = load_sketches(mean / "sketches")
    assert [s.features.shape for s in released] == [(1, TINY["sketch.dim"])] * 4  # one row each left the client
    assert len(load_sketches(cosine / "sketches")[0].outputs) > 1
    np.testing.assert_allclose(np.load(mean / "affinity.npy"), np.load(cosine / "affinity.npy"), atol=1e-5)
    # First-order boosting did not take the one-row release for per-sample rows: it ran and finished.
    assert [r["phase"] for r in map(json.loads, (mean / "metrics.jsonl").read_text().splitlines())].count("boost") >= 2
    with pytest.raises(ConfigError, match="adds no noise"):
        run_pipeline(
            InProcessGrid(4), RunConfig.from_flat({**settings, "affinity.mode": mode, "privacy.noise_multiplier": 1.0})
        )


def test_resuming_a_directory_that_is_not_a_run_names_it(tmp_path):
    with pytest.raises(ConfigError, match="is not a run directory: it has no config.json"):
        run_pipeline(InProcessGrid(4), RunConfig.from_flat({"resume": str(tmp_path)}))
    assert list(tmp_path.iterdir()) == []  # nothing written into it


def test_keep_best_gives_each_group_its_adapter_of_its_lowest_validation_loss(tmp_path):
    """``train.keep_best``: a group's saved adapter is the one a run stopped at its best round would save."""
    from elora_fed.model.adapters import load_peft_adapter

    settings = {**TINY, "boost.steps": 0, "train.rounds": 4, "train.lr": 0.3, "train.validation_every": 1}
    kept = run_pipeline(
        InProcessGrid(4), RunConfig.from_flat({**settings, "train.keep_best": True, "run_dir": str(tmp_path / "kept")})
    )
    curve = [json.loads(line) for line in (kept / "metrics.jsonl").read_text().splitlines()]
    curve = [m for m in curve if m["phase"] == "train"]
    rounds = curve[-1]["kept_rounds"]
    for g, r in rounds.items():
        losses = [m["group_validation_loss"][g] for m in curve]
        assert r == 1 + int(np.argmin(losses))
    assert min(rounds.values()) < 4, f"every group was best at the last round, so this checks nothing: {rounds}"
    g, r = min(rounds.items(), key=lambda item: item[1])
    stopped = run_pipeline(
        InProcessGrid(4), RunConfig.from_flat({**settings, "train.rounds": r, "run_dir": str(tmp_path / "stopped")})
    )
    last = run_pipeline(InProcessGrid(4), RunConfig.from_flat({**settings, "run_dir": str(tmp_path / "last")}))
    want, got = (
        load_peft_adapter(stopped / "adapters" / f"group-{g}"),
        load_peft_adapter(kept / "adapters" / f"group-{g}"),
    )
    other = load_peft_adapter(last / "adapters" / f"group-{g}")
    assert all(torch.allclose(got[k], want[k]) for k in want)
    assert not all(torch.allclose(other[k], want[k]) for k in want)  # the last round's adapter is another


def test_keep_best_without_validation_is_refused():
    with pytest.raises(ConfigError, match="train.keep_best needs train.validation_every"):
        RunConfig.from_flat({"train.keep_best": True})
