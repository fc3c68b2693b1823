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
  weights against the client's own group adapter alone and, where the run directory
  still holds its adapters, uniform weights over the groups (each client's test split
  rescored with ``elora_fed.load_ensemble``; the learned weights are rescored beside it,
  as a check against the run's own number).

Writes ``experiments/results/affinity_diagnostics.{json,md}``. The within-member ranking of
the surrogate and the pairwise-transfer check are measured by ``experiments/surrogate_ranking.py``,
the m sweep by ``experiments/shakespeare_converged.py`` (it needs end-to-end runs); their
results are collected here from ``surrogate_ranking.json`` and ``shakespeare_converged.json``
(``collected``), so this JSON holds every affinity measure. Without run directories it
only rebuilds from what is stored.

    python experiments/affinity_diagnostics.py [runs/converged/ensemble-seed*/pipeline-*]

Runs already in the results JSON are kept, so runs can be added one at a time. Means are
per affinity variant (``affinity.offsets``); a run with offsets removed saved its affinity
with them removed, so its offset share is near 0 by construction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from elora_fed.data.federated_data import load_lm_clients
from elora_fed.ensemble.inference import RunEnsemble, load_ensemble
from elora_fed.grouping.clustering import cluster
from elora_fed.grouping.partitions import adjusted_rand_index, canonical_labels
from elora_fed.surrogate.affinity import offset_variance_share, remove_offsets

RESULTS = Path(__file__).resolve().parent / "results"


def rescored_test_loss(run_dir: Path) -> dict[str, float]:
    """Mean over clients of test loss per target under learned and under uniform group weights."""
    ensemble = load_ensemble(run_dir)
    data = {c.client_id: c for c in load_lm_clients(ensemble.config.data, ensemble.tokenizer).clients}
    m = len(ensemble.groups)
    uniform = dataclasses.replace(ensemble, weights={c: [1.0 / m] * m for c in ensemble.weights})

    def mean_loss(weighted: RunEnsemble) -> float:
        per_client = []
        for client in weighted.clients:
            scores = weighted.score_ids(client, data[client].splits["test"].tolist())
            per_client.append(-np.mean([p for s in scores for p in s.log_probs]))
        return float(np.mean(per_client))

    return {"test_loss_learned_weights_rescored": mean_loss(ensemble), "test_loss_uniform_weights": mean_loss(uniform)}


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
        "offsets": config.get("affinity.offsets", "keep"),
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
        **(rescored_test_loss(run_dir) if (run_dir / "adapters").exists() else {}),
    }


def collected(mean: dict[str, dict[str, float]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's affinity measures in one place: this script's (on the raw affinity, offsets kept) and,
    where their scripts have written them, the surrogate's ranking (and other estimates') and the m sweep."""
    raw = mean.get("keep", {})
    out: dict[str, Any] = {k: raw[k] for k in ("offset_variance_share", "ari_vs_plays") if k in raw}
    rescored = [r for r in runs if "test_loss_uniform_weights" in r]
    if rescored:
        out["weights"] = {
            "runs": [Path(r["run_dir"]).parent.name for r in rescored],
            **{
                k: float(np.mean([r[f"test_loss_{k}"] for r in rescored]))
                for k in ("learned_weights", "own_group", "uniform_weights")
            },
        }
    ranking = RESULTS / "surrogate_ranking.json"
    if ranking.exists():
        stored = json.loads(ranking.read_text())
        for k in ("within_member_order_agreement", "pairwise_transfer_spearman"):
            out[k] = {"by_steps": stored[k], "source": "experiments/results/surrogate_ranking.json"}
    variants = RESULTS / "surrogate_variants.json"
    if variants.exists():
        by_estimate: dict[str, dict[str, float]] = {}
        for r in json.loads(variants.read_text())["rows"]:
            if r["lambda_kind"] in ("default", "none"):
                by_estimate.setdefault(r["estimate"], {})[str(r["steps"])] = r["within_member_order_agreement"]
        out["within_member_order_agreement_by_estimate"] = {
            "by_estimate": by_estimate,
            "source": "experiments/results/surrogate_variants.json",
        }
    converged = RESULTS / "shakespeare_converged.json"
    if converged.exists() and "m_sweep" in (stored := json.loads(converged.read_text())):
        out["m_sweep"] = {**stored["m_sweep"], "source": "experiments/results/shakespeare_converged.json"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="*")
    parser.add_argument("--name", default="affinity_diagnostics")
    args = parser.parse_args()
    # Runs diagnosed before stay in the results (their directories may be gone); a run
    # directory given again is diagnosed again.
    path = RESULTS / f"{args.name}.json"
    given = {str(d) for d in args.run_dirs}
    kept = [r for r in json.loads(path.read_text())["runs"] if r["run_dir"] not in given] if path.exists() else []
    runs = kept + [diagnose(d) for d in args.run_dirs]
    keys = list(dict.fromkeys(k for r in runs for k, v in r.items() if isinstance(v, float)))
    # Means are per affinity variant: a mean over raw and offsets-removed runs says nothing.
    variants = sorted({r.get("offsets", "keep") for r in runs})
    of = {v: [r for r in runs if r.get("offsets", "keep") == v] for v in variants}
    mean = {
        v: {k: float(np.mean([r[k] for r in of[v] if k in r])) for k in keys if any(k in r for r in of[v])}
        for v in variants
    }
    if not runs:
        raise SystemExit(f"no run directories given and none stored in {path}")
    headline = collected(mean, runs)
    path.write_text(json.dumps({**headline, "runs": runs, "mean_by_offsets": mean}, indent=2) + "\n")
    lines = [
        "# Affinity diagnostics",
        "",
        f"{len(runs)} EnsembleLoRA runs; written by `experiments/affinity_diagnostics.py`.",
        "",
        "| measure | "
        + " | ".join(Path(r["run_dir"]).parent.name for r in runs)
        + " | "
        + " | ".join(f"mean, offsets {v}" for v in variants)
        + " |",
        "| --- | " + " | ".join("---" for _ in [*runs, *variants]) + " |",
    ]
    for k in keys:
        cells = [f"{r[k]:.4f}" if k in r else "" for r in runs] + [
            f"{mean[v][k]:.4f}" if k in mean[v] else "" for v in variants
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    blank = " |" * len(variants)
    lines.append("| group sizes | " + " | ".join(str(r["group_sizes"]) for r in runs) + " |" + blank)
    lines.append(
        "| without offsets | " + " | ".join(str(r["group_sizes_without_offsets"]) for r in runs) + " |" + blank
    )
    lines += ["", "Headline measures (offsets kept; the ranking and the m sweep from their own scripts):", ""]
    lines += [f"- `{k}`: {json.dumps(v)}" for k, v in headline.items() if k != "m_sweep"]
    if "m_sweep" in headline:
        lines.append(f"- `m_sweep`: the table in `{headline['m_sweep']['source'].replace('.json', '.md')}`")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
