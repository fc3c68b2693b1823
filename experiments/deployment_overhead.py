"""Per-message overhead in deployment, without and with model holders, side by side in one run.

A real SuperLink and SuperNodes on loopback (``strategies.loopback``) run the same short
pipeline twice with SmolLM2 (the default model): once as Flower 1.42 runs a ClientApp,
a fresh ``flwr-clientapp`` process per message that loads the model stack and the base
model, and once with one model holder per node (``clients.model_holder``), which loads
them once. One node serves one client (one group: ``OneGroup``), so its messages run one
at a time and each exchange's wall time is the sum of its messages' latencies, whatever
else shares the CPU. Per exchange of M messages:

- compute: the client's handler time minus the time it spent loading (``load-s``): the
  model work itself, the same in both modes;
- overhead per message beyond the compute: ``(wall - compute) / M``: process start,
  imports, model and data loading, transport, polling and the server's own work.

    python experiments/deployment_overhead.py [--set KEY=VALUE ...]

Writes ``experiments/results/deployment_overhead.{json,md}``; the run directories and
every process's log go under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from strategies.loopback import processes, start_federation

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SETTINGS: dict[str, Any] = {  # a short pipeline: every phase, a few messages each
    "data.seq_len": 32,
    "data.max_samples_per_client": 12,
    "sketch.dim": 64,
    "affinity.num_subsets": 20,
    "clustering.num_groups": 2,
    "train.rounds": 2,
    "train.local_steps": 2,
    "boost.steps": 1,
    "strategies.clustering": "strategies.baselines:OneGroup",
}


def measure(work: Path, nodes: int, holders: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """One deployed run; per exchange its wall time, compute, loading and overhead per message."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "runs"
    overrides = {**settings, "data.num_clients": nodes, "run_dir": str(run_dir)}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    start = time.perf_counter()
    with processes(work) as started:
        federation = start_federation(started, env, nodes, holders)
        result = federation.flwr_run(REPO, overrides)
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("*/report.json")) and time.monotonic() < deadline:
            time.sleep(1)
    if result.returncode != 0 or not list(run_dir.glob("*/report.json")):
        raise SystemExit(f"deployed run failed ({work}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (metrics_file,) = run_dir.glob("*/metrics.jsonl")
    rows = []
    for line in metrics_file.read_text().splitlines():
        m = json.loads(line)
        if "wall_s" not in m:
            continue
        messages = m["clients"] + m["failed"]
        compute = m["client_compute_s"] - m["client_load_s"]
        rows.append(
            {
                "exchange": m.get("exchange") or m["phase"],
                "messages": messages,
                "wall_s": m["wall_s"],
                "compute_s": round(compute, 3),
                "load_s": m["client_load_s"],
                "overhead_per_message_s": round((m["wall_s"] - compute) / messages, 3),
            }
        )
    per_message = [r["overhead_per_message_s"] for r in rows]
    return {
        "holders": holders,
        "wall_s": round(time.perf_counter() - start, 1),
        "exchanges": rows,
        "messages": sum(r["messages"] for r in rows),
        "overhead_per_message_s": {"median": statistics.median(per_message), "max": max(per_message)},
        "load_s_total": round(sum(r["load_s"] for r in rows), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/deployment_overhead"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = dict(SETTINGS)
    for item in args.overrides:
        key, _, value = item.partition("=")
        settings[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout
    modes = {}
    for name, holders in (("per_message_process", False), ("model_holder", True)):
        print(f"{name}: running", flush=True)
        modes[name] = measure(args.work / name, 1, holders, settings)
        print(f"{name}: overhead per message {modes[name]['overhead_per_message_s']}", flush=True)
    before, after = (modes[k]["overhead_per_message_s"]["median"] for k in ("per_message_process", "model_holder"))
    out = {
        "commit": commit.strip(),
        "machine": {"processor": platform.processor(), "cores": os.cpu_count()},
        "nodes": 1,
        "settings": settings,
        "modes": modes,
        "median_overhead_per_message_s": {"before": before, "after": after},
        "overhead_ratio": before / after if after > 0 else None,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "deployment_overhead.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.results / "deployment_overhead.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Per-message overhead in deployment: a ClientApp process per message against model holders",
        "",
        f"SmolLM2 (default model), {out['nodes']} SuperNode on loopback serving one client; settings "
        f"`{json.dumps(out['settings'])}`; commit {out['commit']}; {out['machine']['cores']} cores. "
        "Written by `experiments/deployment_overhead.py`. Overhead per message = (wall - compute) / messages, "
        "compute = the handlers' time minus their loading.",
        "",
        f"Median overhead per message: **{out['median_overhead_per_message_s']['before']:.2f} s** before, "
        f"**{out['median_overhead_per_message_s']['after']:.2f} s** with model holders.",
        "",
        "| exchange | messages | before: wall s | before: loading s | before: overhead/msg s "
        "| holders: wall s | holders: loading s | holders: overhead/msg s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    before, after = out["modes"]["per_message_process"]["exchanges"], out["modes"]["model_holder"]["exchanges"]
    for b, a in zip(before, after, strict=False):
        lines.append(
            f"| {b['exchange']} | {b['messages']} | {b['wall_s']:.1f} | {b['load_s']:.1f} | "
            f"{b['overhead_per_message_s']:.2f} | {a['wall_s']:.1f} | {a['load_s']:.1f} | {a['overhead_per_message_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
