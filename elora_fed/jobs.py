"""The CLI's jobs, each writing its own run directory.

- ``run_check``: the end-to-end check of base model and data (``elora-fed check``). It prepares the configured clients, scores their
  validation text under the base model in fp32 and 4-bit nf4 and under the tiny random
  model, attaches the seeded LoRA adapter and checks where its first gradient lands.
- ``run_sketch``: every client's projected gradient features, one file per client.
- ``run_affinity``: the task-affinity matrix from a folder of sketches, and the groups.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from elora_fed.config import RunConfig
from elora_fed.data.federated_data import load_clients, load_lm_clients
from elora_fed.data.splits import SPLITS
from elora_fed.grouping.clustering import cluster_clients, groups_record
from elora_fed.grouping.partitions import average_density
from elora_fed.model.adapters import attach_lora
from elora_fed.model.compute import compute_context
from elora_fed.model.config import ModelConfig
from elora_fed.model.evaluation import mean_token_loss
from elora_fed.model.models import TINY_MODEL, load_base_model, load_tokenizer
from elora_fed.plots import affinity_heatmap
from elora_fed.run_dir import create_run_dir, write_json
from elora_fed.sketch.client_sketch import load_sketches, sketch_client, sketch_setup
from elora_fed.surrogate.affinity_modes import affinity_mode


def _console() -> Console:
    """Rich output; 120 columns when piped (rich would wrap tables at 80)."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def run_check(config: RunConfig, eval_samples: int = 4) -> dict[str, Any]:
    console = _console()
    run = create_run_dir(config, "check")
    console.log(f"run directory: {run}")
    tokenizer = load_tokenizer(config.model)
    data = load_lm_clients(config.data, tokenizer)
    stats = data.stats()
    write_json(run / "data_stats.json", stats)
    write_json(
        run / "clients.json",
        [{"client_id": c.client_id, **{s: len(c.splits[s]) for s in SPLITS}} for c in data.clients],
    )
    console.log(
        f"{stats['clients']} clients kept of {stats['candidates']}; samples per client {stats['samples_per_client']}"
    )

    tokens = np.concatenate([c.splits["validation"][:eval_samples] for c in data.clients])
    variants = [
        dataclasses.replace(config.model, precision="fp32"),
        dataclasses.replace(config.model, precision="nf4"),
        ModelConfig(name=TINY_MODEL, precision="fp32", device=config.model.device),
    ]
    results: list[dict[str, Any]] = []
    for variant in variants:
        start = time.perf_counter()
        model = load_base_model(variant)
        loaded = time.perf_counter()
        loss = mean_token_loss(model, tokens)
        scored = time.perf_counter()
        grads = _first_adapter_gradient(model, config, tokens[:4])
        results.append(
            {
                "model": variant.name,
                "precision": variant.precision,
                "val_loss": loss,
                "load_s": loaded - start,
                "score_s": scored - loaded,
                **grads,
            }
        )
        console.log(f"{variant.name} ({variant.precision}): validation loss {loss:.3f} nats/token")
        del model
    report = {"data": stats, "eval_tokens": int(tokens.size), "models": results}
    write_json(run / "check.json", report)

    table = Table(title=f"elora-fed check: {len(tokens)} validation samples of {data.seq_len} tokens")
    for column in ("model", "precision", "val loss", "load s", "score s", "|grad B|", "|grad A|"):
        table.add_column(column, no_wrap=True)
    for r in results:
        table.add_row(
            r["model"],
            r["precision"],
            f"{r['val_loss']:.3f}",
            f"{r['load_s']:.1f}",
            f"{r['score_s']:.1f}",
            f"{r['grad_norm_B']:.2e}",
            f"{r['grad_norm_A']:.1e}",
        )
    console.print(table)
    console.print(f"written to {run}")
    return report


def _first_adapter_gradient(model: torch.nn.Module, config: RunConfig, tokens: np.ndarray) -> dict[str, float]:
    """Gradient norms of the loss w.r.t. LoRA B and A at theta* (A's is zero: B starts at zero)."""
    peft_model = attach_lora(model, config.adapter)  # type: ignore[arg-type]
    device = next(peft_model.parameters()).device
    batch = torch.as_tensor(tokens, dtype=torch.long, device=device)
    peft_model(input_ids=batch, labels=batch).loss.backward()
    norms = {"A": 0.0, "B": 0.0}
    for name, p in peft_model.named_parameters():
        if p.grad is not None:
            norms["A" if "lora_A" in name else "B"] += float(p.grad.float().norm() ** 2)
    return {f"grad_norm_{k}": v**0.5 for k, v in norms.items()}


def run_sketch(config: RunConfig) -> dict[str, Any]:
    """Sketch the train and validation samples of every client into ``<run>/sketches/``."""
    console = _console()
    run = create_run_dir(config, "sketch")
    tokenizer = load_tokenizer(config.model)
    clients = load_clients(config.data, tokenizer)
    model = attach_lora(load_base_model(config.model), config.adapter)
    projector, metadata = sketch_setup(model, config)
    sk = config.sketch
    console.log(f"{len(clients)} clients, p = {projector.input_dim:,} gradient coordinates -> d = {sk.dim}")
    start, rows = time.perf_counter(), 0
    with Progress(console=console) as progress, compute_context(config.model):  # as the pipeline's clients
        task = progress.add_task("sketching clients", total=len(clients))
        for client in clients:
            sketch = sketch_client(
                model, client, projector, metadata, sk.batch_size, sk.buffer_mb, pad_token_id=tokenizer.pad_token_id
            )
            sketch.save(run / "sketches")
            rows += len(sketch.outputs)
            progress.advance(task)
    seconds = time.perf_counter() - start
    summary = {"clients": len(clients), "rows": rows, "seconds": seconds, "samples_per_s": rows / seconds}
    write_json(run / "sketch_summary.json", {**summary, "metadata": dataclasses.asdict(metadata)})
    console.print(f"sketched {rows} samples of {len(clients)} clients in {seconds:.1f} s into {run / 'sketches'}")
    return summary


def run_affinity(config: RunConfig, sketches: Path) -> dict[str, Any]:
    """Affinity matrix, heatmap and groups of the clients sketched in ``sketches``.

    The affinity is ``affinity.mode``'s estimate from what each client would release (so
    with ``privacy`` on, from noised releases, as a server would see them).
    """
    console = _console()
    run = create_run_dir(config, "affinity")
    loaded = load_sketches(sketches)
    ids = [s.client_id for s in loaded]
    af, cl = config.affinity, config.clustering
    start = time.perf_counter()
    mode = affinity_mode(config)  # offline, a secure mode estimates from its releases as its private twin does
    releases = [mode.release(s) for s in loaded]
    affinity = np.asarray(mode.estimate(releases), dtype=np.float64)
    affinity_s = time.perf_counter() - start
    console.log(f"affinity of {len(ids)} clients ({af.mode}) in {affinity_s:.1f} s")
    start = time.perf_counter()
    labels = cluster_clients(affinity, cl, config.seed)
    clustering_s = time.perf_counter() - start
    np.save(run / "affinity.npy", affinity)
    affinity_heatmap(affinity, labels, ids, run / "affinity.png")
    groups = groups_record(ids, labels)
    summary = {
        **groups,
        "num_groups": len(groups["groups"]),
        "average_density": average_density(affinity, labels),
        "affinity_mode": af.mode,
        "lam": af.lam,
        "clustering_method": cl.method,
        "seconds": {
            "affinity": affinity_s,
            "clustering": clustering_s,
        },
    }
    write_json(run / "groups.json", summary)
    console.print(f"{summary['num_groups']} groups of sizes {[len(g) for g in groups['groups']]}; written to {run}")
    return summary
