"""Per-message overhead in deployment: Flower as it is, model holders, short waits, prestarted ClientApps.

A real SuperLink and SuperNodes on loopback (``strategies.loopback``) run the same short
pipeline four times, side by side in one run, with SmolLM2 (the default model) (``MODES``):
as Flower 1.42 runs a ClientApp, a fresh ``flwr-clientapp`` process per message that loads
the model stack and the base model; with one model holder per node
(``clients.model_holder``), which loads them once; with the holder behind ``elora-fed
supernode --no-prestart`` (``clients.supernode``), Flower's SuperNode with waits of a
fraction of a second; and behind ``elora-fed supernode``, whose ClientApp processes are
started, and Flower imported, before their message (``clients.prestarted``). One node serves one client (one
group: ``OneGroup``), so its messages run one at a time and each exchange's wall time is
the sum of its messages' latencies, whatever else shares the CPU. Per exchange of M messages:

- compute: the client's handler time minus the time it spent loading (``load-s``): the
  model work itself, the same in every mode;
- overhead per message beyond the compute: ``(wall - compute) / M``: process start,
  imports, model and data loading, transport, polling and the server's own work.

    python experiments/deployment_overhead.py [--set KEY=VALUE ...] [--modes NAME ...] [--results DIR]

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
    "train.rounds": 4,
    "train.local_steps": 2,
    "boost.steps": 1,
    "strategies.clustering": "strategies.baselines:OneGroup",
}


def measure(
    work: Path, nodes: int, holders: bool, settings: dict[str, Any], short_waits: bool = False, prestart: bool = False
) -> dict[str, Any]:
    """One deployed run; per exchange its wall time, compute, loading and overhead per message."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "runs"
    overrides = {**settings, "data.num_clients": nodes, "run_dir": str(run_dir)}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    start = time.perf_counter()
    with processes(work) as started:
        federation = start_federation(started, env, nodes, holders, short_waits, prestart)
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


MODES = {  # name -> (model holders, elora-fed supernode's short waits, its prestarted ClientApps)
    "per_message_process": (False, False, False),
    "model_holder": (True, False, False),
    "model_holder_short_waits": (True, True, False),
    "model_holder_short_waits_prestarted": (True, True, True),
}
"""Flower 1.42 as it is; with a model holder per node; behind ``elora-fed supernode --no-prestart``; behind
``elora-fed supernode``."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/deployment_overhead"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="run only these modes")
    args = parser.parse_args()
    settings = dict(SETTINGS)
    for item in args.overrides:
        key, _, value = item.partition("=")
        settings[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout
    modes = {}
    for name in args.modes:
        holders, short_waits, prestart = MODES[name]
        print(f"{name}: running", flush=True)
        modes[name] = measure(args.work / name, 1, holders, settings, short_waits, prestart)
        print(f"{name}: overhead per message {modes[name]['overhead_per_message_s']}", flush=True)
    medians = {name: mode["overhead_per_message_s"]["median"] for name, mode in modes.items()}
    out = {
        "commit": commit.strip(),
        "machine": {"processor": platform.processor(), "cores": os.cpu_count()},
        "nodes": 1,
        "settings": settings,
        "modes": modes,
        "median_overhead_per_message_s": medians,
    }
    first, last = args.modes[0], args.modes[-1]
    out["overhead_ratio"] = medians[first] / medians[last]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "deployment_overhead.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.results / "deployment_overhead.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    names = list(out["modes"])
    medians = out["median_overhead_per_message_s"]
    lines = [
        "# Per-message overhead in deployment: Flower's ClientApp per message, model holders, short waits, "
        "prestarted ClientApps",
        "",
        f"SmolLM2 (default model), {out['nodes']} SuperNode on loopback serving one client; settings "
        f"`{json.dumps(out['settings'])}`; commit {out['commit']}; {out['machine']['cores']} cores. "
        "Written by `experiments/deployment_overhead.py`. Overhead per message = (wall - compute) / messages, "
        "compute = the handlers' time minus their loading. Modes: " + "; ".join(f"`{n}`" for n in names) + ".",
        "",
        "Median overhead per message: "
        + ", ".join(f"`{n}` **{medians[n]:.2f} s**" for n in names)
        + f" ({out['overhead_ratio']:.1f}x less from first to last).",
        "",
        "| exchange | messages | "
        + " | ".join(f"{n}: wall s | {n}: loading s | {n}: overhead/msg s" for n in names)
        + " |",
        "| --- | --- | " + " | ".join("--- | --- | ---" for _ in names) + " |",
    ]
    rows = zip(*(out["modes"][n]["exchanges"] for n in names), strict=False)
    for row in rows:
        cells = " | ".join(f"{r['wall_s']:.1f} | {r['load_s']:.1f} | {r['overhead_per_message_s']:.2f}" for r in row)
        lines.append(f"| {row[0]['exchange']} | {row[0]['messages']} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
