"""Which part of the surrogate loses the within-member ranking: the projection, the ridge, or the linearization?

`experiments/surrogate_ranking.py` finds the pipeline's estimate (ridge logistic regression
on JL sketches at d = 400) near chance at ordering subsets for a member. This script reuses
its 42 real fine-tunings (``--work``) and replaces one piece of the estimate at a time, all
from one fp32 pass that captures, for every LoRA module, sample and position t, lora_A's
input x_t and the gradient of h at lora_B's output (``LayerCapture``):

- ``ridge-jl400``: the pipeline's estimate, rebuilt from the captures (the "before");
- ``ridge-exact``: the same ridge without the projection (features whose Gram matrix is the
  exact gradients' one: a ridge solution lies in the rows' span, so this is the d -> inf
  limit). What JL noise costs;
- ``ridge-exact-adam``: the ridge in Adam's geometry: every gradient coordinate scaled by
  (sqrt(v) + eps)^(-1/2), v the mean square of the first-step minibatch gradients over all
  roles' train batches, then rescaled to the unscaled rows' mean norm, so that the ridge's
  implicit gradient flow is preconditioned as Adam's first steps are. Deployable: v is one
  p-vector the server can average;
- ``linear-adam``: no ridge at all. The real optimizer (Adam, the same lr, steps, batches and
  batch order as the real run) on the sketch's first-order model h_s(B) = b_s + g_s . B, in
  the full parameter space: the best any surrogate linear in B can do;
- ``factor-adam``: the same, but A trains too, on h_s(A, B) = b_s + sum_t grad_t . (B A x_t):
  first order in each module's weight change B A, exact in the LoRA factors. Adam moves A
  by about lr per step, comparable to A's own scale within tens of steps, which a model
  linear in B cannot see.

Each is scored as surrogate_ranking scores the pipeline: within-member order agreement,
Kendall tau, and the pairwise transfer Spearman (the real gain f_i({i}) - f_i({i, j}) against
the estimate's own), at 20, 40 and 100 steps; ridge variants with the default lambda and
with lambda calibrated on the 2 calibration subsets. The captures take about 3 GB of memory.

    python experiments/surrogate_variants.py [--work experiments/results/surrogate_ranking]

Writes experiments/results/surrogate_variants.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from surrogate_ranking import (
    DIM,
    LAMBDA_GRID,
    LENGTHS,
    RESULTS,
    RankingSetup,
    job_path,
    ranking_scores,
    ranking_setup,
)
from torch import nn

from elora_fed.model.adapters import load_adapter_state
from elora_fed.model.batches import Batch
from elora_fed.model.models import EMBEDDED_MODEL
from elora_fed.sketch.projection import JLProjector
from elora_fed.surrogate.config import AffinityConfig
from elora_fed.surrogate.lambda_calibration import calibrate_lambda
from elora_fed.surrogate.subset_solver import solve_subsets
from elora_fed.surrogate.task_features import TaskFeatures

Subset = tuple[int, ...]
Parts = list[tuple[torch.Tensor, torch.Tensor]]  # per LoRA module: x (n, T, in), grad (n, T, out)
ADAM_EPS = 1e-8  # torch.optim.Adam's default, as in the real runs
ESTIMATES = ("ridge-jl400", "ridge-exact", "ridge-exact-adam", "linear-adam", "factor-adam")


class LayerCapture:
    """Per LoRA module and sample: lora_A's input x_t and the gradient of h at lora_B's output, every position t.

    With them, h_s(A, B) ~= b_s + sum_modules sum_t grad_t . (B A x_t): first order in each
    module's weight change W = B A, exact in the LoRA factors. Its B-gradient at (A*, 0),
    sum_t grad_t (A* x_t)^T, is the sketched g_s.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.a: list[nn.Linear] = [layer.lora_A["default"] for layer in self.layers]  # type: ignore[misc]
        self.b: list[nn.Linear] = [layer.lora_B["default"] for layer in self.layers]  # type: ignore[misc]

    def batch(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Parts]:
        """h (n,) and (x, grad) per module for one batch."""
        x: dict[int, torch.Tensor] = {}
        grad: dict[int, torch.Tensor] = {}

        def keep_input(k: int) -> Callable[..., None]:
            return lambda _module, args, _out: x.__setitem__(k, args[0].detach())

        def keep_grad(k: int) -> Callable[..., None]:
            def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
                out.register_hook(lambda g: grad.__setitem__(k, g.detach()))

            return hook

        handles = []
        for k, (a, b) in enumerate(zip(self.a, self.b, strict=True)):
            handles.append(a.register_forward_hook(keep_input(k)))
            handles.append(b.register_forward_hook(keep_grad(k)))
        try:
            h = batch.outputs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
            torch.autograd.grad(h.sum(), [b.weight for b in self.b])
        finally:
            for handle in handles:
                handle.remove()
        return h.detach().float(), [(x[k].float(), grad[k].float()) for k in range(len(self.layers))]


def capture_all(setup: RankingSetup) -> tuple[dict[str, list[list[tuple[torch.Tensor, Parts]]]], list[torch.Tensor]]:
    """Per split, role and batch: (h, parts) at theta*, fp32; and every module's A*."""
    load_adapter_state(setup.model, setup.theta_star)
    setup.model.eval()
    capture = LayerCapture(setup.model)
    a_star = [a.weight.detach().clone() for a in capture.a]
    with torch.autocast("cpu", enabled=False):
        captured = {
            split: [[capture.batch(setup.model, b) for b in role] for role in batches]
            for split, batches in (("train", setup.train_batches), ("validation", setup.val_batches))
        }
    return captured, a_star


def b_gradients(parts: Parts, a_star: list[torch.Tensor]) -> torch.Tensor:
    """(n, p): the per-sample gradients of h with respect to every B, flattened as the sketch flattens them."""
    return torch.cat(
        [torch.einsum("nto,ntr->nor", g, x @ a.T).flatten(1) for (x, g), a in zip(parts, a_star, strict=True)], dim=1
    )


def ridge_tasks(
    rows: dict[str, list[list[tuple[torch.Tensor, torch.Tensor]]]], transform: Callable[[torch.Tensor], torch.Tensor]
) -> list[TaskFeatures]:
    """Each role's (h, B-gradient) rows with features ``transform(all rows)``, split back per role and split."""
    blocks = [torch.cat([g for _, g in role]) for split in ("train", "validation") for role in rows[split]]
    features = transform(torch.cat(blocks)).split([len(b) for b in blocks])
    n = len(rows["train"])
    return [
        TaskFeatures(
            str(i),
            torch.cat([h for h, _ in rows["train"][i]]),
            features[i].float().contiguous(),
            torch.cat([h for h, _ in rows["validation"][i]]),
            features[n + i].float().contiguous(),
        )
        for i in range(n)
    ]


def gram_features(g: torch.Tensor) -> torch.Tensor:
    """Rows F with F F^T = g g^T (float64 eigendecomposition): a ridge on F is the ridge on g."""
    values, vectors = torch.linalg.eigh(g.double() @ g.double().T)
    keep = values > values.max() * 1e-12
    return vectors[:, keep] * values[keep].sqrt()


def adam_scale(train: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """(sqrt(v) + eps)^(-1/2), v the mean square of every train batch's mean loss gradient at theta*.

    Rescaled so that the scaled rows keep the unscaled rows' mean squared norm, and one
    lambda grid serves both.
    """
    rows = [(h, g) for role in train for h, g in role]
    v = torch.stack([((torch.sigmoid(-h)[:, None] * g).mean(0)) ** 2 for h, g in rows]).mean(0)
    scale = (v.sqrt() + ADAM_EPS) ** -0.5
    g = torch.cat([g for _, g in rows])
    return scale * ((g**2).sum(1).mean() / ((g * scale) ** 2).sum(1).mean()).sqrt()


def adam_on_factor_model(
    captured: dict[str, list[list[tuple[torch.Tensor, Parts]]]],
    a_star: list[torch.Tensor],
    subset: Subset,
    seed: int,
    steps: list[int],
    lr: float,
    train_a: bool,
) -> dict[int, np.ndarray]:
    """Members' validation losses after each of ``steps`` Adam steps on h_s(A, B) (``LayerCapture``), float64.

    The real run's optimizer, lr, batches and batch order (``train_adapter`` with seed = the
    job index). ``train_a=False`` keeps A at A*: the model is then linear in B, the sketch's
    first-order model.
    """
    a = [t.double().clone().requires_grad_(train_a) for t in a_star]
    b = [
        torch.zeros(g.shape[2], t.shape[0], dtype=torch.float64, requires_grad=True)
        for (_, g), t in zip(captured["train"][0][0][1], a_star, strict=True)
    ]
    optimizer = torch.optim.Adam([*b, *(a if train_a else [])], lr=lr)

    def h(base: torch.Tensor, parts: Parts) -> torch.Tensor:
        out = base.double()
        for (x, g), a_k, b_k in zip(parts, a, b, strict=True):
            out = out + ((x.double() @ a_k.T) * (g.double() @ b_k)).sum((1, 2))
        return out

    train = [row for i in subset for row in captured["train"][i]]
    rng = np.random.RandomState(seed)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(-(-max(steps) // len(train)))])
    out: dict[int, np.ndarray] = {}
    for t in range(1, max(steps) + 1):
        loss = nn.functional.softplus(-h(*train[int(order[t - 1])])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if t in steps:
            with torch.no_grad():
                out[t] = np.array(
                    [
                        float(torch.cat([nn.functional.softplus(-h(*row)) for row in captured["validation"][i]]).mean())
                        for i in subset
                    ]
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=RESULTS / "surrogate_ranking", help="surrogate_ranking's --work")
    parser.add_argument("--steps", type=int, default=20, help="surrogate_ranking's --steps")
    parser.add_argument("--lr", type=float, default=5e-4, help="surrogate_ranking's --lr")
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--roles", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--calibration-subsets", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where surrogate_variants.{json,md} go")
    args = parser.parse_args()
    lengths = [args.steps * k for k in LENGTHS]
    setup = ranking_setup(args.model, args.roles, 8, args.pairs, args.calibration_subsets)
    plan, n = setup.plan, len(setup.clients)
    subsets = [s for kind in ("singles", "pairs", "calibration") for s in plan[kind]]
    missing = [s for s in subsets if not job_path(args.work, s).exists()]
    if missing:
        raise SystemExit(
            f"{len(missing)} of {len(subsets)} fine-tunings missing in {args.work}: run surrogate_ranking.py first"
        )
    real: dict[int, dict[Subset, np.ndarray]] = {t: {} for t in lengths}
    for s in subsets:
        stored = json.loads(job_path(args.work, s).read_text())
        for t in lengths:
            real[t][s] = np.array(stored["losses"][str(t)])
    evaluated = plan["singles"] + plan["pairs"]

    start = time.perf_counter()
    captured, a_star = capture_all(setup)
    capture_s = time.perf_counter() - start
    rows = {
        split: [[(h, b_gradients(parts, a_star)) for h, parts in role] for role in captured[split]]
        for split in captured
    }
    p = rows["train"][0][0][1].shape[1]
    scale = adam_scale(rows["train"])
    features = {
        "ridge-jl400": ridge_tasks(rows, JLProjector(p, DIM, seed=0).project),
        "ridge-exact": ridge_tasks(rows, gram_features),
        "ridge-exact-adam": ridge_tasks(rows, lambda g: gram_features(g * scale)),
    }
    results: list[dict[str, Any]] = []

    def record(name: str, t: int, kind: str, lam: float | None, est: dict[Subset, np.ndarray]) -> None:
        real_t = {s: real[t][s] for s in evaluated}
        results.append(
            {
                "estimate": name,
                "steps": t,
                "lambda_kind": kind,
                "lambda": lam,
                **ranking_scores(est, real_t, plan["pairs"], n),
            }
        )
        print(json.dumps(results[-1]), flush=True)

    default_lam = AffinityConfig().lam
    for t in lengths:
        calibration = [(s, real[t][s]) for s in plan["calibration"]]
        for name, tasks in features.items():
            for kind, lam in (
                ("default", default_lam),
                ("calibrated", calibrate_lambda(tasks, calibration, LAMBDA_GRID)),
            ):
                solved = solve_subsets(tasks, evaluated, lam)
                record(name, t, kind, lam, {s: solved.losses[k, : len(s)] for k, s in enumerate(evaluated)})
    start = time.perf_counter()
    for name, train_a in (("linear-adam", False), ("factor-adam", True)):
        # the seed is the subset's job index in surrogate_ranking: its real run's batch order
        simulated = {
            s: adam_on_factor_model(captured, a_star, s, k, lengths, args.lr, train_a)
            for k, s in enumerate(subsets)
            if s in evaluated
        }
        for t in lengths:
            record(name, t, "none", None, {s: simulated[s][t] for s in evaluated})
    simulation_s = time.perf_counter() - start

    report = {
        "setup": {
            "fine_tunings": f"{len(evaluated)} of surrogate_ranking.py's, scored; {len(plan['calibration'])} more "
            "for lambda calibration",
            "work": str(args.work),
            "roles": [c.client_id for c in setup.clients],
            "gradient_dim": p,
            "sketch_dim": DIM,
            "lr": args.lr,
            "default_lambda": default_lam,
            "lambda_grid": [LAMBDA_GRID[0], LAMBDA_GRID[-1]],
        },
        "capture_s": capture_s,
        "simulation_s": simulation_s,
        "rows": results,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "surrogate_variants.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Which part of the surrogate loses the within-member ranking",
        "",
        f"The {len(evaluated)} scored subsets and real fine-tunings of `experiments/surrogate_ranking.py`; "
        "written by `experiments/surrogate_variants.py`. Chance order agreement is 0.5.",
        "",
        "| estimate | fine-tuning steps | lambda | order agreement | Kendall tau | pair gain Spearman | relative error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r["steps"], ESTIMATES.index(r["estimate"]))):
        lam_text = "—" if r["lambda"] is None else f"{r['lambda_kind']} {r['lambda']:.2g}"
        lines.append(
            f"| {r['estimate']} | {r['steps']} | {lam_text} | {r['within_member_order_agreement']:.3f} | "
            f"{r['kendall_tau']:.3f} | {r['pairwise_transfer_spearman_direct']:.3f} | {r['relative_error']:.4f} |"
        )
    (args.results / "surrogate_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
