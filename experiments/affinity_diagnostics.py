"""What the affinity matrix and the learned weights of finished EnsembleLoRA runs say, without new training.

For every run directory given (``runs/converged/ensemble-seed*/pipeline-*`` of
``experiments/shakespeare_converged.py``):
- ``offset_variance_share``: how much of the affinity's off-diagonal variance per-client
  main effects explain (``elora_fed.surrogate.affinity.offset_variance_share``);
- ``ari_vs_plays``: the adjusted Rand index of the run's groups against the clients' plays,
  and of the groups the same clustering finds on the affinity without offsets
  (``ari_vs_plays_without_offsets``), with their agreement (``ari_with_without_offsets``);
- the learned weights: the share of clients whose largest weight exceeds 0.99 (one-hot),
  the share whose largest weight is on their own group, and test loss under the learned
  weights against the client's own group adapter alone.

Writes ``experiments/results/affinity_diagnostics.{json,md}``. The within-member ranking of
the surrogate, the pairwise-transfer check and the m sweep need new fine-tuning runs and
are not part of this script yet.

    python experiments/affinity_diagnostics.py runs/converged/ensemble-seed*/pipeline-*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from elora_fed.grouping.clustering import cluster
from elora_fed.grouping.partitions import adjusted_rand_index, canonical_labels
from elora_fed.surrogate.affinity import offset_variance_share, remove_offsets

RESULTS = Path(__file__).resolve().parent / "results"


def diagnose(run_dir: Path) -> dict[str, Any]:
    affinity = np.load(run_dir / "affinity.npy")
    groups = json.loads((run_dir / "groups.json").read_text())
    clients, labels = groups["clients"], np.asarray(groups["labels"])
    config = json.loads((run_dir / "config.json").read_text())
    plays = canonical_labels(np.unique([c.split(":")[0] for c in clients], return_inverse=True)[1])
    m = len(set(labels.tolist()))
    centered = cluster(remove_offsets(affinity), m, method=config["clustering.method"], seed=config["seed"]).labels
    report = json.loads((run_dir / "report.json").read_text())
    rows = report["clients"]
    top = [max(r["weights"].values()) for r in rows]
    on_own = [max(r["weights"], key=r["weights"].get) == str(r["group"]) for r in rows]
    return {
        "run_dir": str(run_dir),
        "num_clients": len(clients),
        "num_groups": m,
        "group_sizes": sorted(np.bincount(labels).tolist(), reverse=True),
        "num_plays": int(plays.max()) + 1,
        "offset_variance_share": offset_variance_share(affinity),
        "ari_vs_plays": adjusted_rand_index(labels, plays),
        "ari_vs_plays_without_offsets": adjusted_rand_index(centered, plays),
        "ari_with_without_offsets": adjusted_rand_index(labels, centered),
        "group_sizes_without_offsets": sorted(np.bincount(centered).tolist(), reverse=True),
        "weights_one_hot_share": float(np.mean([t > 0.99 for t in top])),
        "weights_top_is_own_group_share": float(np.mean(on_own)),
        "test_loss_learned_weights": report["average"]["ensemble"]["test_loss"],
        "test_loss_own_group": report["average"]["own_group"]["test_loss"],
        "test_loss_base": report["average"]["base_model"]["test_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--name", default="affinity_diagnostics")
    args = parser.parse_args()
    runs = [diagnose(d) for d in args.run_dirs]
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    out = {
        "runs": runs,
        "mean": {k: float(np.mean([r[k] for r in runs])) for k in keys},
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Affinity diagnostics",
        "",
        f"{len(runs)} EnsembleLoRA runs; written by `experiments/affinity_diagnostics.py`.",
        "",
        "| measure | " + " | ".join(Path(r["run_dir"]).parent.name for r in runs) + " | mean |",
        "| --- | " + " | ".join("---" for _ in runs) + " | --- |",
    ]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{r[k]:.4f}" for r in runs) + f" | {out['mean'][k]:.4f} |")
    lines.append("| group sizes | " + " | ".join(str(r["group_sizes"]) for r in runs) + " | |")
    lines.append("| without offsets | " + " | ".join(str(r["group_sizes_without_offsets"]) for r in runs) + " | |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
