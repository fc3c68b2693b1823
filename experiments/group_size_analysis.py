"""Per group of finished converged runs: its own adapter's test loss against one adapter's, by size.

Reads ``experiments/results/shakespeare_converged/runs/*.json`` (``experiments/shakespeare_converged.py``)
and, for every group of every grouped run (EnsembleLoRA, random groups) whose seed also has a
finished one-adapter run, compares on the group's clients: the base model, the group's own
adapter alone, the run's prediction (learned weights over the groups, plus boosting) and the
one adapter of the same seed. ``own_minus_one_adapter`` > 0 means the group's adapter is worse
on its own clients than one adapter trained on every client at the same budget.

Writes ``experiments/results/group_size_analysis.{json,md}``. No training.

    python experiments/group_size_analysis.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    runs_dir = RESULTS / "shakespeare_converged" / "runs"
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))}
    rows = []
    for key, run in runs.items():
        if "-seed" not in key:  # the learning curve
            continue
        method, seed = key.rsplit("-seed", 1)  # seed: "0", or "0-nf4", paired with qlora-seed0-nf4
        one = runs.get(f"qlora-seed{seed}")
        if method not in ("ensemble", "random", "ensemble-centered", "cosine") or one is None:
            continue
        one_loss = {c["client_id"]: c["test_loss"] for c in one["clients"]}
        groups: dict[int, list[dict]] = {}
        for c in run["clients"]:
            groups.setdefault(c["group"], []).append(c)
        for group, clients in sorted(groups.items(), key=lambda kv: -len(kv[1])):

            def mean(values: list[float]) -> float:
                return float(np.mean(values))

            row = {
                "run": key,
                "group": group,
                "size": len(clients),
                "base": mean([c["base_test_loss"] for c in clients]),
                "own_adapter": mean([c["own_group_test_loss"] for c in clients]),
                "prediction": mean([c["test_loss"] for c in clients]),
                "one_adapter": mean([one_loss[c["client_id"]] for c in clients]),
            }
            row["own_minus_one_adapter"] = row["own_adapter"] - row["one_adapter"]
            row["prediction_minus_one_adapter"] = row["prediction"] - row["one_adapter"]
            rows.append(row)
    out = {"runs": sorted({r["run"] for r in rows}), "groups": rows}
    (RESULTS / "group_size_analysis.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Group adapters against one adapter, by group size",
        "",
        f"Runs: {', '.join(out['runs'])} (each against `qlora` of its seed); mean test loss over the group's "
        "clients. Written by `experiments/group_size_analysis.py`.",
        "",
        "| run | group | roles | base | own adapter | prediction | one adapter | own - one | prediction - one |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['group']} | {r['size']} | {r['base']:.3f} | {r['own_adapter']:.3f} | "
            f"{r['prediction']:.3f} | {r['one_adapter']:.3f} | {r['own_minus_one_adapter']:+.3f} | "
            f"{r['prediction_minus_one_adapter']:+.3f} |"
        )
    (RESULTS / "group_size_analysis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
