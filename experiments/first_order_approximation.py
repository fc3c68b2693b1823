"""How well the first-order estimate b + g . (theta - theta*) predicts a fine-tuned adapter's output.

The paper's Table 5, here: LoRA and QLoRA adapters (r = 4 on q, v) on SmolLM2-135M are
really fine-tuned on Shakespeare roles (A and B train, as in ordinary LoRA; and, to
separate the second-order A-B term, B alone), and at
relative weight distances of 0.05% to 0.25% the real output h of held-out samples is
compared with the first-order estimate from the gradients taken at theta*:

    h(theta) ~ b + g_B . vec(B)      (g_A = 0 at B = 0, so B is the whole first-order term)

Relative weight distance: ||sum of the adapted layers' delta W = s B A||_F over ||W||_F of
those layers (Frobenius norms over all adapted layers together).

    python experiments/first_order_approximation.py [--roles 4] [--steps 60]

Writes experiments/results/first_order_approximation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from elora_fed.data.config import DataConfig
from elora_fed.data.federated_data import load_lm_clients
from elora_fed.model.adapters import attach_lora
from elora_fed.model.batches import lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import EMBEDDED_MODEL, load_base_model, load_tokenizer
from elora_fed.sketch.gradients import gradient_parameters, per_sample_gradients

RESULTS = Path(__file__).parent / "results"
TARGETS = (0.0005, 0.0010, 0.0015, 0.0020, 0.0025)
ADAPTER = AdapterConfig(rank=4, alpha=8, target_modules="q_proj,v_proj", seed=0)


def adapted_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


def weight_distance(layers: list[torch.nn.Module], base_norm: float) -> float:
    squared = 0.0
    for layer in layers:
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        squared += float(delta.pow(2).sum())
    return squared**0.5 / base_norm


def run(
    precision: str, train_a: bool, train: np.ndarray, held_out: np.ndarray, args: argparse.Namespace, base_norm: float
) -> list[dict]:
    model = attach_lora(load_base_model(ModelConfig(name=EMBEDDED_MODEL, precision=precision)), ADAPTER)
    if not train_a:  # B alone: the first-order term is then the only linear change
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    layers = adapted_layers(model)
    eval_batch = lm_batch(held_out)
    b, g = per_sample_gradients(model, eval_batch)  # at theta*: exact, unprojected gradients of B
    b_params = [p for _, p in gradient_parameters(model)]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = np.random.RandomState(0)
    rows, pending = [], list(TARGETS)
    for step in range(1, args.steps + 1):
        batch = torch.as_tensor(train[rng.choice(len(train), args.batch_size, replace=False)], dtype=torch.long)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            distance = weight_distance(layers, base_norm)
        if pending and distance >= pending[0]:
            while pending and distance >= pending[0]:
                target = pending.pop(0)
            with torch.no_grad():
                h = eval_batch.outputs(model(input_ids=eval_batch.input_ids).logits)
                delta_b = torch.cat([p.reshape(-1) for p in b_params])
                estimate = b + g @ delta_b
            row = {
                "precision": precision,
                "trained": "A and B" if train_a else "B only",
                "target_distance": target,
                "relative_weight_distance": distance,
                "step": step,
                "relative_error": float(((h - estimate).abs() / h.abs()).mean()),
                "relative_error_of_change": float((h - estimate).norm() / (h - b).norm()),
                "mean_output_change": float((h - b).abs().mean()),
                "train_loss": float(loss.detach()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not pending:
            break
    if pending:
        print(f"{precision}: stopped at distance {distance:.5f} before reaching {pending}: raise --steps or --lr")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=8, help="validation samples per role")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(ModelConfig(name=EMBEDDED_MODEL))
    data = load_lm_clients(DataConfig(seq_len=64, num_clients=args.roles, max_samples_per_client=80), tokenizer)
    train = np.concatenate([c.splits["train"] for c in data.clients])
    held_out = np.concatenate([c.splits["validation"][: args.held_out] for c in data.clients])
    dense = load_base_model(ModelConfig(name=EMBEDDED_MODEL))
    base_norm = (
        sum(float(m.weight.pow(2).sum()) for n, m in dense.named_modules() if n.endswith(("q_proj", "v_proj"))) ** 0.5
    )
    del dense
    started = time.time()
    variants = [("fp32", True), ("nf4", True), ("fp32", False)]
    rows = [row for precision, train_a in variants for row in run(precision, train_a, train, held_out, args, base_norm)]
    report = {
        "setup": {
            "model": EMBEDDED_MODEL,
            "adapter": "LoRA r=4, alpha=8, q_proj,v_proj",
            "roles": [c.client_id for c in data.clients],
            "train_samples": len(train),
            "held_out_samples": len(held_out),
            "seq_len": 64,
            "optimizer": f"Adam lr={args.lr}, batch {args.batch_size}",
            "seconds": time.time() - started,
        },
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_order_approximation.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# First-order approximation of fine-tuned outputs (SmolLM2-135M, Shakespeare roles)",
        "",
        "| base | trained | relative weight distance | step | relative error of h | error relative to the change in h | mean abs change in h |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {'QLoRA (nf4)' if r['precision'] == 'nf4' else 'LoRA (fp32)'} | {r['trained']} | "
            f"{100 * r['relative_weight_distance']:.3f}% | "
            f"{r['step']} | {100 * r['relative_error']:.3f}% | {100 * r['relative_error_of_change']:.1f}% | {r['mean_output_change']:.4f} |"
        )
    (RESULTS / "first_order_approximation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
