"""Where a pipeline run's time goes: per phase and exchange, wall time against the clients' own compute.

Reads ``metrics.jsonl`` and ``report.json`` of a finished run directory (``elora-fed run``).
Every exchange line records its wall time and the sum of the clients' ``compute-s`` (time
inside the handler: loading nothing but the per-process cache, then the model work). With
``W`` clients working in parallel (Ray actors: CPUs / ``federation.cpus_per_client``), the
simulation overhead of an exchange is ``wall - compute / W`` (W capped at the number of messages): message transport, actor
scheduling, serialization and the server's own work. Per message that is
``(W * wall - compute) / messages``.

    python experiments/pipeline_timing.py RUN_DIR --workers 2 [--name demo]

Writes ``experiments/results/pipeline_timing_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("sketch", "groups", "train", "boost", "weights", "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--workers", type=int, required=True, help="clients working in parallel (Ray actors)")
    parser.add_argument("--name", default="run")
    args = parser.parse_args()
    report = json.loads((args.run_dir / "report.json").read_text())
    rows = []
    for line in (args.run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "wall_s" not in m:
            continue
        label = m.get("exchange") or m["phase"] + (f" round {m['round']}" if "round" in m else "")
        compute, wall, messages = m["client_compute_s"], m["wall_s"], m["clients"] + m["failed"]
        workers = max(1, min(args.workers, messages))
        overhead = max(0.0, wall - compute / workers)
        rows.append(
            {
                "exchange": label,
                "messages": messages,
                "wall_s": wall,
                "client_compute_s": compute,
                "overhead_s": round(overhead, 3),
                "overhead_per_message_s": round(overhead * workers / messages, 4) if messages else None,
                "overhead_share": round(overhead / wall, 4) if wall else None,
            }
        )
    result = {
        "run_dir": str(args.run_dir),
        "workers": args.workers,
        "clients": report["num_clients"],
        "groups": report["num_groups"],
        "phase_seconds": report["seconds"],
        "average_test_loss": {k: v["test_loss"] for k, v in report["average"].items()},
        "exchanges": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pipeline_timing_{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Pipeline timing: {args.name} ({report['num_clients']} clients, {report['num_groups']} groups, {args.workers} workers)",
        "",
        f"Run: `{args.run_dir}`. Test loss: "
        + ", ".join(f"{k} {v:.4f}" for k, v in result["average_test_loss"].items())
        + ".",
        "",
        "| phase | wall s |",
        "| --- | --- |",
        *[f"| {p} | {report['seconds'][p]:.1f} |" for p in PHASES if p in report["seconds"]],
        f"| total | {sum(report['seconds'].values()):.1f} |",
        "",
        "| exchange | messages | wall s | client compute s | overhead s | overhead per message s | overhead share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['exchange']} | {r['messages']} | {r['wall_s']:.1f} | {r['client_compute_s']:.1f} | "
            f"{r['overhead_s']:.1f} | {r['overhead_per_message_s']} | {r['overhead_share']:.1%} |"
            for r in rows
        ],
    ]
    (RESULTS / f"pipeline_timing_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
