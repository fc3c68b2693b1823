"""The model holder: a real holder process serving real handlers over loopback, as a deployed node uses it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from clients.handlers import HANDLERS
from clients.model_holder import NODE_CONFIG_KEY, ModelHolderError, run_handler
from clients.protocol import run_record
from clients.records import sketch_from_record
from elora_fed.config import RunConfig
from tests.test_pipeline import REPO, _env

CONFIG = RunConfig.from_flat(
    {
        "model.name": "tiny-random",
        "model.compute_dtype": "fp32",
        "data.num_clients": 3,
        "data.max_samples_per_client": 12,
        "sketch.dim": 16,
    }
)


def request(**records) -> RecordDict:
    return RecordDict({"run": run_record(CONFIG), **records})


def context(partition: int, holder: Path | None) -> Context:
    node_config = {"partition-id": partition, "num-partitions": 3}
    if holder is not None:
        node_config[NODE_CONFIG_KEY] = str(holder)
    return Context(run_id=1, node_id=10 + partition, node_config=node_config, state=RecordDict(), run_config={})


def start_holder(file: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "elora_fed.cli", "model-holder", "--file", str(file)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return proc


@pytest.mark.e2e
def test_the_client_app_starts_without_the_model_stack():
    """A deployed node starts one ClientApp process per message: its import must stay cheap."""
    code = "import sys, clients.app; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.e2e
def test_a_holder_serves_every_call_from_one_model_load_and_answers_as_the_local_handler(tmp_path):
    file = tmp_path / "holder.json"
    proc = start_holder(file, tmp_path / "holder.log")
    try:
        assert oct(file.stat().st_mode & 0o777) == "0o600"  # the key is readable by its owner only
        stats = run_handler("stats", request(options=ConfigRecord({"with-theta-star": True})), context(0, file))
        held = [run_handler("sketch", request(), context(1, file)) for _ in range(2)]
        metrics = [r.metric_records["metrics"] for r in (stats, *held)]
        assert [m["model-loads"] for m in metrics] == [1, 1, 1]  # the holder's process loaded the model once
        assert metrics[0]["load-s"] > 0 and metrics[2]["load-s"] == 0
        local = sketch_from_record(HANDLERS["sketch"](request(), context(1, None)))
        for reply in held:
            sketch = sketch_from_record(reply)
            assert sketch.client_id == local.client_id
            np.testing.assert_allclose(sketch.features, local.features, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(sketch.outputs, local.outputs, rtol=1e-5, atol=1e-6)

        # A handler's error comes back as a named error, and the holder keeps serving.
        with pytest.raises(ModelHolderError, match="partition-id 7 is out of range"):
            run_handler("stats", request(), context(7, file))
        assert run_handler("stats", request(), context(2, file)).config_records["client"]["client_id"]
        # A caller without the key is refused.
        info = json.loads(file.read_text())
        (tmp_path / "wrong.json").write_text(json.dumps({**info, "key": "00" * 32}))
        with pytest.raises(ModelHolderError, match="refused the key"):
            run_handler("stats", request(), context(0, tmp_path / "wrong.json"))
        assert run_handler("stats", request(), context(0, file)).config_records["client"]["client_id"]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    log = (tmp_path / "holder.log").read_text()
    assert "refused a connection" in log and "stopped after 6 calls" in log, log
    assert not file.exists()  # the holder removes its file when it stops


def test_a_node_naming_a_holder_that_is_not_running_gets_an_error_that_says_how_to_start_it(tmp_path):
    missing = tmp_path / "holder.json"
    with pytest.raises(ModelHolderError, match=r"elora-fed model-holder --file .*holder\.json"):
        run_handler("stats", request(), context(0, missing))
