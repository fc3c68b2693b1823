"""How good is first-order evaluation at the server, for the decisions it would replace?

For a finished pipeline run, every group's output on every client's train and validation
samples two ways: real (the model run with the group's adapters, per-sample mean h) and
first order from the run's own sketches, b + g~ . P^T (B - B*) (``elora_fed.sketch.first_order``),
with no model pass. Reported:

- the error of h per sample, and of its change from theta* (relative norm, correlation),
  and, as an ablation, the same with exact per-sample gradients instead of sketches (the
  linearization alone, without the projection);
- boosting's choice: each group's training loss, real (per target, the pipeline's
  criterion) against first order (per sample), and whether the chosen group agrees;
- ensemble weights: fit on validation from real outputs against first-order outputs, both
  then evaluated really, on validation and on test (per target).

    python experiments/first_order_evaluation.py RUN_DIR [--name demo]

Writes ``experiments/results/first_order_evaluation_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elora_fed.checkpoint import Checkpoint, group_ensembles
from elora_fed.config import RunConfig
from elora_fed.data.federated_data import load_clients
from elora_fed.ensemble.outputs import AdapterState, GroupAdapters, Outputs, combine, group_outputs
from elora_fed.ensemble.weights import fit_weights
from elora_fed.model.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.model.batches import client_batches
from elora_fed.model.compute import compute_context, resolve_compute_dtype
from elora_fed.model.models import load_base_model, load_tokenizer
from elora_fed.sketch.client_sketch import load_sketches, sketch_setup
from elora_fed.sketch.first_order import first_order_outputs, group_direction
from elora_fed.sketch.gradients import per_sample_gradients

RESULTS = Path(__file__).resolve().parent / "results"


def ensemble_of(run_dir: Path) -> tuple[dict[str, int], dict[int, GroupAdapters]]:
    """Each client's group, and each group's adapters, from the run's groups.json and checkpoint."""
    grouping = json.loads((run_dir / "groups.json").read_text())
    group_of = {c: int(g) for c, g in zip(grouping["clients"], grouping["labels"], strict=True)}
    snapshot = Checkpoint(run_dir).load()
    if snapshot is None:
        raise SystemExit(f"{run_dir} has no checkpoint")
    return group_of, group_ensembles(snapshot, sorted(set(group_of.values())))


def b_change(group: GroupAdapters, theta_star: AdapterState, eta: float) -> np.ndarray:
    """The group's unprojected change of the lora_B coordinates, v_0 + eta * sum_t v_t, in gradient order."""

    def change(state: AdapterState) -> np.ndarray:
        names = [n for n in theta_star if ".lora_B." in n]
        return torch.cat([(state[n] - theta_star[n]).double().reshape(-1) for n in names]).numpy()

    return change(group.base) + eta * sum((change(t) for t in group.boosts), np.zeros_like(change(group.base)))


def per_sample_loss(h: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, -h)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", default="run")
    parser.add_argument("--max-clients", type=int, default=0, help="evaluate only the first N clients (0: all)")
    args = parser.parse_args()
    config = RunConfig.from_flat(json.loads((args.run_dir / "config.json").read_text()))
    group_of, ensemble = ensemble_of(args.run_dir)
    tokenizer = load_tokenizer(config.model)
    clients = {c.client_id: c for c in load_clients(config.data, tokenizer)}
    model = attach_lora(load_base_model(config.model), config.adapter)
    theta_star = adapter_state(model)
    projector, _ = sketch_setup(model, config)
    eta = config.boost.eta
    directions = {g: group_direction(group, theta_star, projector, eta) for g, group in ensemble.items()}
    sketches = {s.client_id: s for s in load_sketches(args.run_dir / "sketches")}
    total_clients = len(sketches)
    if args.max_clients:
        sketches = dict(sorted(sketches.items())[: args.max_clients])
    groups = sorted(ensemble)

    real: dict[tuple[str, str, int], Outputs] = {}
    first: dict[tuple[str, str, int], np.ndarray] = {}
    exact: dict[tuple[str, str, int], np.ndarray] = {}
    exact_directions = {g: b_change(group, theta_star, eta) for g, group in ensemble.items()}
    base: dict[tuple[str, str], np.ndarray] = {}
    with compute_context(config.model):
        for n, (client_id, sketch) in enumerate(sorted(sketches.items())):
            for split in ("train", "validation", "test"):
                batches = [
                    b
                    for _, b in client_batches(
                        clients[client_id], split, config.sketch.batch_size, tokenizer.pad_token_id
                    )
                ]
                if split != "test":  # the ablation: exact per-sample gradients at theta*, no projection
                    load_adapter_state(model, theta_star)
                    grads = torch.cat([per_sample_gradients(model, b)[1] for b in batches]).double().numpy()
                for g in groups:
                    real[(client_id, split, g)] = group_outputs(model, batches, ensemble[g], theta_star, eta)
                    if split != "test":
                        b, features = sketch.rows(split)
                        base[(client_id, split)] = b
                        first[(client_id, split, g)] = first_order_outputs(b, features, directions[g])
                        exact[(client_id, split, g)] = first_order_outputs(b, grads, exact_directions[g])
            print(f"[first-order] {n + 1}/{len(sketches)} clients evaluated", flush=True)

    errors: dict[str, Any] = {}
    for split in ("train", "validation"):
        keys = [k for k in first if k[1] == split]
        h = np.concatenate([real[k].per_sample().double().numpy() for k in keys])
        est = np.concatenate([first[k] for k in keys])
        b = np.concatenate([base[(k[0], split)] for k in keys])
        unprojected = np.concatenate([exact[k] for k in keys])
        errors[split] = {
            "samples": len(h),
            "exact_gradient_change_relative_error": float(np.linalg.norm(unprojected - h) / np.linalg.norm(h - b)),
            "exact_gradient_change_correlation": float(np.corrcoef(unprojected - b, h - b)[0, 1]),
            "h_mean_abs_error": float(np.mean(np.abs(est - h))),
            "change_mean_abs": float(np.mean(np.abs(h - b))),
            "change_relative_error": float(np.linalg.norm(est - h) / np.linalg.norm(h - b)),
            "change_correlation": float(np.corrcoef(est - b, h - b)[0, 1]),
        }

    choice: dict[str, Any] = {"groups": {}}
    for g in groups:
        members = [c for c in sketches if group_of[c] == g]
        if not members:
            continue
        outs = [real[(c, "train", g)] for c in members]
        targets = torch.cat([o.h[o.mask] for o in outs]).double().numpy()
        choice["groups"][str(g)] = {
            "members": len(members),
            "real_per_target": per_sample_loss(targets),
            "real_per_sample": per_sample_loss(np.concatenate([o.per_sample().double().numpy() for o in outs])),
            "first_order_per_sample": per_sample_loss(np.concatenate([first[(c, "train", g)] for c in members])),
        }
    for key in ("real_per_target", "real_per_sample", "first_order_per_sample"):
        choice[f"chosen_by_{key}"] = max(choice["groups"], key=lambda g, k=key: choice["groups"][g][k])

    ens = config.ensemble
    weights: dict[str, Any] = {"real": {"validation": [], "test": []}, "first_order": {"validation": [], "test": []}}
    for c in sorted(sketches):
        val = [real[(c, "validation", g)] for g in groups]
        estimated = [
            Outputs(
                torch.as_tensor(first[(c, "validation", g)])[:, None],
                torch.ones(len(first[(c, "validation", g)]), 1, dtype=torch.bool),
            )
            for g in groups
        ]
        fitted = {
            "real": fit_weights(val, ens.weight_steps, ens.weight_lr),
            "first_order": fit_weights(estimated, ens.weight_steps, ens.weight_lr),
        }
        for how, w in fitted.items():
            for split in ("validation", "test"):
                weights[how][split].append(combine([real[(c, split, g)] for g in groups], w).loss())
    summary = {how: {split: float(np.mean(v)) for split, v in per.items()} for how, per in weights.items()}

    result = {
        "run_dir": str(args.run_dir),
        "clients": len(sketches),
        "of_clients": total_clients,
        "groups": len(groups),
        "boosts": {str(g): len(ensemble[g].boosts) for g in groups},
        "compute_dtype": resolve_compute_dtype(config.model),
        "errors": errors,
        "boost_choice": choice,
        "weights_loss": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"first_order_evaluation_{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# First-order evaluation at the server: {args.name} ({len(sketches)} of {total_clients} clients, "
        f"{len(groups)} groups)",
        "",
        f"Run: `{args.run_dir}`; real passes in {result['compute_dtype']}. Written by "
        "`experiments/first_order_evaluation.py`.",
        "",
        "| split | samples x groups | h mean abs error | mean abs change of h | change rel. error | change correlation "
        "| ablation, exact gradients: change rel. error | its correlation |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {s} | {e['samples']} | {e['h_mean_abs_error']:.4f} | {e['change_mean_abs']:.4f} | "
            f"{e['change_relative_error']:.3f} | {e['change_correlation']:.3f} | "
            f"{e['exact_gradient_change_relative_error']:.3f} | {e['exact_gradient_change_correlation']:.3f} |"
            for s, e in errors.items()
        ],
        "",
        "Boosting's choice (training loss of each group on its own clients among those evaluated):",
        "",
        "| group | clients | real, per target | real, per sample | first order, per sample |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {g} | {r['members']} | {r['real_per_target']:.4f} | {r['real_per_sample']:.4f} | "
            f"{r['first_order_per_sample']:.4f} |"
            for g, r in choice["groups"].items()
        ],
        "",
        f"Chosen group: real per target {choice['chosen_by_real_per_target']}, real per sample "
        f"{choice['chosen_by_real_per_sample']}, first order {choice['chosen_by_first_order_per_sample']}.",
        "",
        "Ensemble weights fit on validation, then evaluated really (mean over clients, per-target loss):",
        "",
        "| weights fit on | validation loss | test loss |",
        "| --- | --- | --- |",
        *[f"| {how} outputs | {v['validation']:.4f} | {v['test']:.4f} |" for how, v in summary.items()],
    ]
    (RESULTS / f"first_order_evaluation_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
