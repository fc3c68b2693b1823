"""The secure affinity mode end to end: SecAgg+ sums on Flower's simulation engine on Ray, against the private mode.

One simulation (a subprocess, its own Ray) of 6 tiny-model clients runs the pipeline twice
on the same federation: ``affinity.mode = "private"`` (clients send their statistics) and
``"secure"`` (SecAgg+ sums per subset), the second through a grid that records every reply
the server receives. It then runs one more SecAgg+ round over three clients directly
(``secure_sum``). The tests check that the affinities agree within the bound that
SecAgg+'s quantization step implies, and that the server never received a client's
statistics in secure mode: no statistics in the run directory, no statistics records in
any reply, and masked-stage vectors that look nothing like the plain quantized values.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.protocol import run_config
from elora_fed.config import RunConfig
from elora_fed.errors import ConfigError, DataError
from elora_fed.surrogate.affinity import sample_subsets
from elora_fed.surrogate.quadratic_sums import quadratic_solutions, stack_statistics
from elora_fed.surrogate.statistics import (
    ClientStatistics,
    aggregation_vector,
    client_statistics,
    load_statistics,
    statistics_from_aggregate,
)
from elora_fed.surrogate.task_features import TaskFeatures
from strategies.secure_statistics import disjoint_waves
from tests.test_pipeline import REPO, _env

SETTINGS = {
    "model.name": "tiny-random",
    "data.num_clients": 6,
    "data.seq_len": 16,
    "data.max_samples_per_client": 12,
    "sketch.dim": 32,
    "affinity.num_subsets": 4,
    "affinity.subset_size": 3,
    "clustering.num_groups": 1,
    "train.rounds": 0,
    "boost.steps": 0,
    # Sums of <= 3 clients: 3 * 2^28 < 2^32. Step 2 * 64 / 2^28 = 4.8e-7; the largest statistic here is ~12.
    "secagg.clipping_range": 64.0,
    "secagg.quantization_range": 2**28,
}
DIRECT = 3  # clients in the direct SecAgg+ round


def simulate(out: str) -> None:
    """Run in a subprocess: both pipelines and one direct secure sum in one simulation; results under ``out``."""
    from flwr.app import Context, Message
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from strategies.federation import GroupGrid, discover
    from strategies.ledger import Ledger
    from strategies.pipeline import run_pipeline
    from strategies.secure_statistics import secure_sum

    folder = Path(out)
    configs = {
        mode: RunConfig.from_flat({**SETTINGS, "affinity.mode": mode, "run_dir": str(folder / mode)})
        for mode in ("private", "secure")
    }
    coarse = {k: v for k, v in SETTINGS.items() if not k.startswith("secagg.")}  # the default quantization
    configs["secure-default"] = RunConfig.from_flat(
        {**coarse, "affinity.mode": "secure", "run_dir": str(folder / "coarse")}
    )
    replies: list[Message] = []

    class RecordingGrid(GroupGrid):
        """The simulation's grid, keeping every reply the server receives."""

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            pulled = list(self._grid.pull_messages(message_ids))
            replies.extend(pulled)
            return pulled

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            received = list(self._grid.send_and_receive(messages, timeout=timeout))
            replies.extend(received)
            return received

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            started = time.perf_counter()
            run_pipeline(grid, configs["private"])
            private_s = time.perf_counter() - started
            recording = RecordingGrid(grid, sorted(grid.get_node_ids()))
            started = time.perf_counter()
            run_pipeline(recording, configs["secure"])
            secure_s = time.perf_counter() - started
            first = len(replies)
            run_pipeline(grid, configs["secure-default"])
            fed = discover(grid, configs["secure"], sorted(grid.get_node_ids()), Ledger({}))
            client_by_node = {node: client for client, node in fed.node_of.items()}
            clients = fed.client_ids[:DIRECT]
            total = secure_sum(fed, recording, [fed.node_of[c] for c in clients])
            masked = {}
            for reply in replies[first:]:
                record = reply.content.config_records.get("secaggplus_configs")
                if record is not None and "masked_params" in record:
                    arrays = [np.load(io.BytesIO(b)) for b in record["masked_params"]]  # type: ignore[union-attr,arg-type]
                    masked[fed.client_of(reply)] = np.concatenate([a.reshape(-1) for a in arrays])
            arrays_out: dict[str, np.ndarray] = {"total": total, "clients": np.array(clients)}
            arrays_out.update({f"masked/{c}": v for c, v in masked.items()})
            np.savez(folder / "direct.npz", **arrays_out)  # type: ignore[arg-type]
            received = [
                {
                    "client": client_by_node.get(r.metadata.src_node_id, ""),
                    "type": r.metadata.message_type,
                    "error": r.has_error(),
                    "arrays": {
                        name: {k: list(a.shape) for k, a in rec.items()}
                        for name, rec in r.content.array_records.items()
                    },
                    "configs": sorted(r.content.config_records),
                }
                for r in replies[:first]
            ]
            (folder / "received.json").write_text(json.dumps(received))
            (folder / "seconds.json").write_text(json.dumps({"private": private_s, "secure": secure_s}))
        except BaseException:
            (folder / "error.txt").write_text(traceback.format_exc())

    run_simulation(
        app, client_app, num_supernodes=6, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("secagg")
    code = f"import tests.test_secure_aggregation as t; t.simulate({str(out)!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900, env=_env()
    )
    error = out / "error.txt"
    assert not error.exists(), error.read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def run_dir(out: Path, mode: str) -> Path:
    (found,) = (out / mode).iterdir()
    return found


def quantization_bound(out: Path, config: RunConfig) -> tuple[float, float]:
    """First-order bound on |A_secure - A_private| from the quantization step, and the largest |f^| (for rounding).

    Each client's quantized vector is off by less than one step D = 2 c / Q per entry, so a
    subset sum over k clients by less than k D: count by dn, gradient sum by ||dg|| <= sqrt(d) k D,
    curvature sum by ||dH|| <= d k D. With A = H / n + lam I (||A^-1|| <= 1 / lam) and
    w = -A^-1 g / n, dw = -A^-1 (dA w + d(g / n)), so
    ||dw|| <= (||dH|| / n + ||H|| dn / n^2) ||w|| / lam + (||dg|| / n + ||g|| dn / n^2) / lam,
    and a member's f^_i = (loss_i + grad_i . w + w^T curv_i w / 2) / n_i moves by at most
    ||grad_i + curv_i w|| ||dw|| / n_i + ||curv_i|| ||dw||^2 / (2 n_i). T_ij averages f^_i over
    subsets and the singles are not quantized (clients solve them from exact statistics), so
    every affinity entry moves by at most the largest such change. Computed here from the
    private run's statistics, which are the plain values the secure run quantized.
    """
    af, sa = config.affinity, config.secagg
    step = 2 * sa.clipping_range / sa.quantization_range
    ids, stats = load_statistics(run_dir(out, "private") / "statistics.npz")
    n, d = len(ids), stats[0].dim
    worst, largest = 0.0, 0.0
    for subset in sample_subsets(n, min(af.subset_size, n), af.num_subsets, af.seed):
        k = len(subset)
        train = [stats[i].train for i in subset]
        total = stack_statistics(train, torch.device("cpu"), torch.float64)
        sums = type(train[0])(*(getattr(total, f).sum(0, keepdim=True) for f in ("count", "loss", "grad", "curv")))
        w, _ = quadratic_solutions(sums, af.lam)
        w = w[0].double()
        count = float(sums.count[0])
        h_norm = float(torch.linalg.matrix_norm(sums.curv[0], 2))
        g_norm = float(torch.linalg.vector_norm(sums.grad[0]))
        dn = k * step
        dw = (
            (d * k * step / count + h_norm * dn / count**2) * float(w.norm())
            + np.sqrt(d) * k * step / count
            + g_norm * dn / count**2
        ) / af.lam
        for i in subset:
            val = stats[i].validation
            curv, grad, vn = val.curv.double(), val.grad.double(), float(val.count)
            slope = float(torch.linalg.vector_norm(grad + curv @ w)) / vn
            worst = max(worst, slope * dw + float(torch.linalg.matrix_norm(curv, 2)) * dw**2 / (2 * vn))
            largest = max(largest, abs(float(val.loss) + float(grad @ w) + 0.5 * float(w @ curv @ w)) / vn)
    return worst, largest


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("folder", "secagg"),
    [
        ("secure", {k: v for k, v in SETTINGS.items() if k.startswith("secagg.")}),  # step 4.8e-7
        ("coarse", {}),  # the defaults: step 2 * 4096 / 2^26 = 1.2e-4
    ],
)
def test_secure_affinity_equals_the_private_mode_within_the_quantization_bound(runs, folder, secagg):
    private = np.load(run_dir(runs, "private") / "affinity.npy")
    secure = np.load(run_dir(runs, folder) / "affinity.npy")
    assert private.shape == secure.shape == (6, 6)
    settings = {k: v for k, v in SETTINGS.items() if not k.startswith("secagg.")}
    bound, largest = quantization_bound(runs, RunConfig.from_flat({**settings, **secagg}))
    # Both modes solve in float32: their f^ values, differences of numbers up to `largest`, round differently.
    tolerance = 2 * bound + 64 * np.finfo(np.float32).eps * largest
    difference = np.abs(secure - private)
    print(
        f"max |A| {np.abs(private).max():.3e}, max |secure - private| {difference.max():.3e} "
        f"(relative {difference.max() / np.abs(private).max():.2e}), quantization bound {bound:.3e}, "
        f"tolerance {tolerance:.3e}, seconds {json.loads((runs / 'seconds.json').read_text())}"
    )
    assert difference.max() <= tolerance
    assert tolerance < 0.02 * np.abs(private).max()  # the comparison is not vacuous
    # The clients computed their statistics once, in the sketch phase, not once per subset (projected rows
    # per phase). The coarse run repeats the settings the statistics depend on: the clients still held them.
    phases = json.loads((run_dir(runs, folder) / "accounting.json").read_text())["phases"]
    private_rows = json.loads((run_dir(runs, "private") / "accounting.json").read_text())["phases"]["sketch"]
    assert phases["sketch"]["projected_rows"] == (private_rows["projected_rows"] if folder == "secure" else 0)
    assert phases["groups"]["projected_rows"] == 0 and phases["groups"]["bytes"]["received"] > 0
    groups = [json.loads((run_dir(runs, m) / "groups.json").read_text())["groups"] for m in ("private", folder)]
    assert groups[0] == groups[1]
    assert json.loads((run_dir(runs, folder) / "report.json").read_text())["num_clients"] == 6


@pytest.mark.e2e
def test_the_server_never_receives_a_clients_statistics_in_secure_mode(runs):
    secure_dir = run_dir(runs, "secure")
    assert not (secure_dir / "statistics.npz").exists() and not (secure_dir / "sketches").exists()
    assert (run_dir(runs, "private") / "statistics.npz").exists()
    received = json.loads((runs / "received.json").read_text())
    assert not any(r["error"] for r in received)
    secagg = [r for r in received if "secaggplus_configs" in r["configs"]]
    assert len(secagg) >= 4 * 3 * 5  # 4 stages, 3 clients, at least 5 subsets to cover 15 pairs
    for reply in received:
        assert "statistics" not in reply["arrays"] and "sketch" not in reply["arrays"]
        if reply in secagg:  # Flower's mod empties the plain FitRes parameters before they leave the client
            assert all(not arrays for arrays in reply["arrays"].values()), reply
        elif reply["type"] == "query.surrogate_losses":  # one loss per subset held, or one single-task estimate
            assert set(reply["arrays"]) == {"surrogate"}
            assert all(len(shape) == 1 and shape[0] <= 10 for shape in reply["arrays"]["surrogate"].values())

    # The direct round: the masked vectors the server received vs the plain quantized vectors.
    config = RunConfig.from_flat(SETTINGS)
    sa = config.secagg
    ids, stats = load_statistics(run_dir(runs, "private") / "statistics.npz")
    plain = {c: aggregation_vector(s.train) for c, s in zip(ids, stats, strict=True)}
    with np.load(runs / "direct.npz") as direct:
        clients = [str(c) for c in direct["clients"]]
        total = direct["total"]
        masked = {k.split("/", 1)[1]: direct[k] for k in direct.files if k.startswith("masked/")}
    assert sorted(masked) == sorted(clients)
    quantizer = sa.quantization_range / (2 * sa.clipping_range)
    for client in clients:
        vector = masked[client][1:]  # Flower prepends the weight factor
        quantized = np.round((plain[client] + sa.clipping_range) * quantizer)
        assert vector.shape == quantized.shape
        assert np.mean(np.abs(vector - quantized) <= 1) < 0.01  # no entry travels in the clear
        # Uniform over the modulus, not the quantization range: a share 1 - q/M of the entries lies above q
        # (0 if they travelled in the clear). 6 binomial standard deviations below that share fail at random
        # with probability 2e-7 per client here (the bound before, 0.9, failed 7.5% of runs: 3 clients of 187
        # entries each, with q/M = 1/16).
        above = 1 - sa.quantization_range / sa.modulus_range
        assert np.mean(vector > sa.quantization_range) > above - 6 * np.sqrt(above * (1 - above) / len(vector))
        assert abs(np.corrcoef(vector, quantized)[0, 1]) < 0.5
    # ... and their unmasked sum is the plain sum, within one quantization step per client.
    step = 2 * sa.clipping_range / sa.quantization_range
    expected = sum(plain[c] for c in clients)
    assert np.abs(total - expected).max() <= len(clients) * step + 1e-6 * np.abs(expected).max()


def test_aggregated_vectors_sum_to_the_summed_statistics():
    rng = np.random.default_rng(0)
    tasks = [
        TaskFeatures(
            f"c{i}",
            torch.tensor(rng.normal(-1, 1, 7), dtype=torch.float32),
            torch.tensor(rng.normal(0, 1, (7, 5)), dtype=torch.float32),
            torch.tensor(rng.normal(-1, 1, 3), dtype=torch.float32),
            torch.tensor(rng.normal(0, 1, (3, 5)), dtype=torch.float32),
        )
        for i in range(3)
    ]
    stats = [client_statistics(t, dtype=torch.float64) for t in tasks]
    vector = sum(aggregation_vector(s.train) for s in stats)
    assert vector.shape == (1 + 5 + 15,)  # count, gradient sum, curvature upper triangle
    summed = statistics_from_aggregate(vector, 5)
    expected = stats[0].train + stats[1].train + stats[2].train
    for name in ("count", "grad", "curv"):
        np.testing.assert_allclose(getattr(summed, name).numpy(), getattr(expected, name).numpy(), rtol=1e-12)
    with pytest.raises(DataError, match="d = 4"):
        statistics_from_aggregate(vector, 4)


def test_concurrent_subsets_share_no_client():
    subsets = sample_subsets(12, 3, 40, seed=2)
    waves = disjoint_waves(subsets, width=3)
    assert sorted(k for wave in waves for k in wave) == list(range(len(subsets)))
    for wave in waves:
        members = [i for k in wave for i in subsets[k]]
        assert len(wave) <= 3 and len(members) == len(set(members))


def test_secagg_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="secagg.modulus_range"):
        RunConfig.from_flat({"secagg.modulus_range": 3 * 2**20})
    with pytest.raises(ConfigError, match="secagg.quantization_range or affinity.subset_size"):
        RunConfig.from_flat({"affinity.mode": "secure", "affinity.subset_size": 64})  # 64 * 2^26 = 2^32
    RunConfig.from_flat({"affinity.mode": "private", "affinity.subset_size": 64})  # only the secure mode sums


def test_a_client_refuses_statistics_beyond_the_clipping_range():
    from flwr.app import ConfigRecord, Context, RecordDict

    from clients.protocol import run_record
    from clients.secure import secure_statistics_content

    task = TaskFeatures("big", torch.full((5,), -1.0), torch.ones(5, 2), torch.full((2,), -1.0), torch.ones(2, 2))
    stats = client_statistics(task)  # count 5
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def statistics(request: RecordDict, context: Context) -> tuple[str, ClientStatistics, int]:
        return "big", stats, 0

    def request(clipping_range: float) -> RecordDict:
        config = RunConfig.from_flat({**SETTINGS, "affinity.mode": "secure", "secagg.clipping_range": clipping_range})
        content = RecordDict({"fitins.config": ConfigRecord({"config": str(run_record(config)["config"])})})
        assert run_config(RecordDict({"run": content.config_records["fitins.config"]})) == config
        return content

    with pytest.raises(DataError, match=r"magnitude 5 exceeds secagg.clipping_range = 4"):
        secure_statistics_content(request(4.0), context, statistics)
    reply = secure_statistics_content(request(8.0), context, statistics)
    (vector,) = [np.load(io.BytesIO(a.data)) for a in reply.array_records["fitres.parameters"].values()]
    np.testing.assert_array_equal(vector, aggregation_vector(stats.train))
    assert reply.metric_records["fitres.num_examples"]["num_examples"] == 1


def test_statistics_are_computed_once_per_run_and_kept_in_the_nodes_state():
    from flwr.app import Context, RecordDict

    from clients.secure import StatisticsCache

    task = TaskFeatures("c", torch.full((4,), -1.0), torch.ones(4, 3), torch.full((2,), -1.0), torch.ones(2, 3))
    calls = []

    def compute() -> tuple[ClientStatistics, int]:
        calls.append(1)
        return client_statistics(task), 6

    config = RunConfig.from_flat({**SETTINGS, "sketch.dim": 3, "affinity.mode": "secure"})
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    first, rows = StatisticsCache().get(config, "c", context, compute)
    assert rows == 6 and len(calls) == 1
    # Another process (a fresh cache) serving the same node reads the node's state.
    again, rows = StatisticsCache().get(config, "c", context, compute)
    assert rows == 0 and len(calls) == 1
    np.testing.assert_array_equal(again.train.curv.numpy(), first.train.curv.numpy())
    # Settings the statistics depend on change them; others (the secagg section) do not.
    StatisticsCache().get(
        RunConfig.from_flat({**SETTINGS, "sketch.dim": 3, "secagg.clipping_range": 9.0}), "c", context, compute
    )
    assert len(calls) == 1
    StatisticsCache().get(RunConfig.from_flat({**SETTINGS, "sketch.dim": 3, "sketch.seed": 1}), "c", context, compute)
    assert len(calls) == 2
