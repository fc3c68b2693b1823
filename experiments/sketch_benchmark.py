"""Benchmark of the sketch engine against the naive per-sample loop and the physical floor.

Setup (issue 3): SmolLM2-135M, batches of 16 samples of 64 tokens, LoRA r=4 on q,v and r=16
on all linear layers, d = 400. Three things are timed in the same run, per sample:
- engine: batched per-sample gradients of h and their projection (``sketch_batches``);
- naive: one unpadded forward and one autograd call per sample, then the same projection;
- plain: a batched forward and backward of sum(h) with no per-sample work (the floor).
Peak memory is the process's resident set, sampled during each phase, above its level
before the phase; the engine is also run at d and 4d on the same samples, to show that its
memory does not grow with p x d (P itself would take p x d x 4 bytes). Results go to experiments/results/sketch_benchmark.{json,md}.

    python experiments/sketch_benchmark.py [--batches 6] [--device cpu|cuda] [--random-weights]
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from elora_fed.data.config import DataConfig
from elora_fed.data.federated_data import load_lm_clients
from elora_fed.model.adapters import attach_lora
from elora_fed.model.batches import Batch, lm_batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import EMBEDDED_MODEL, load_base_model, load_tokenizer
from elora_fed.sketch.gradients import gradient_dim, gradient_parameters, naive_per_sample_gradients, sketch_batches
from elora_fed.sketch.projection import JLProjector

RESULTS = Path(__file__).parent / "results"
SETUPS = {
    "lora_r4_qv": AdapterConfig(rank=4, target_modules="q_proj,v_proj"),
    "lora_r16_all": AdapterConfig(rank=16, alpha=32, target_modules="all-linear"),
}


class PeakMemory:
    """Peak RSS (and CUDA max allocated) above the level at entry, sampled every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.rss_mb = (self.peak - self.base) / 2**20
        self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, PeakMemory]:
    with PeakMemory() as memory:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, memory


def plain(model: torch.nn.Module, batches: list[Batch]) -> None:
    params = [p for _, p in gradient_parameters(model)]
    for batch in batches:
        h = batch.outputs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
        torch.autograd.grad(h.sum(), params)


def measure(
    model_config: ModelConfig,
    adapter: AdapterConfig,
    batches: list[Batch],
    tokens: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Time engine, plain and naive for one adapter setup, on a fresh copy of the base model."""
    device = torch.device(args.device)
    base = load_base_model(model_config)
    if args.random_weights:
        torch.manual_seed(0)
        base = type(base)(base.config).to(device=device, dtype=base.dtype).eval().requires_grad_(False)
    model = attach_lora(base, adapter)
    p = gradient_dim(model)
    projector = JLProjector(p, args.dim, seed=0, block_rows=4096)
    naive_batch = lm_batch(tokens[: args.naive_samples].numpy()).to(device)
    plain(model, batches[:1])  # warm-up, both paths
    sketch_batches(model, batches[:1], projector, args.buffer_mb)
    plain_s, plain_mem = timed(lambda: plain(model, batches), device)
    engine_s, engine_mem = timed(lambda: sketch_batches(model, batches, projector, args.buffer_mb), device)
    naive_s, naive_mem = timed(lambda: projector.project(naive_per_sample_gradients(model, naive_batch)[1]), device)
    # Memory must not grow with p x d: the same samples sketched at d and 4d.
    by_d = {}
    for dim in (args.dim, 4 * args.dim):
        wide = JLProjector(p, dim, seed=0, block_rows=4096)
        by_d[dim] = timed(lambda wide=wide: sketch_batches(model, batches[:2], wide, args.buffer_mb), device)[1].rss_mb
    n = len(batches) * args.batch_size
    return {
        "engine_peak_rss_mb_by_d_on_32_samples": by_d,
        "p": p,
        "d": args.dim,
        "projection_matrix_mb_if_stored": p * args.dim * 4 / 2**20,
        "engine_s_per_sample": engine_s / n,
        "plain_s_per_sample": plain_s / n,
        "naive_s_per_sample": naive_s / args.naive_samples,
        "engine_samples_per_s": n / engine_s,
        "plain_samples_per_s": n / plain_s,
        "naive_samples_per_s": args.naive_samples / naive_s,
        "time_ratio_to_plain": engine_s / plain_s,
        "speedup_vs_naive": (naive_s / args.naive_samples) / (engine_s / n),
        "peak_rss_mb": {"engine": engine_mem.rss_mb, "plain": plain_mem.rss_mb, "naive": naive_mem.rss_mb},
        "peak_cuda_mb": {"engine": engine_mem.cuda_mb, "plain": plain_mem.cuda_mb, "naive": naive_mem.cuda_mb},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6, help="batches timed for engine and plain")
    parser.add_argument("--naive-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2's architecture with random weights")
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--buffer-mb", type=int, default=2048)
    parser.add_argument("--out", default="sketch_benchmark")
    args = parser.parse_args()
    device = torch.device(args.device)
    model_config = ModelConfig(name=EMBEDDED_MODEL, precision=args.dtype, device=args.device)
    tokenizer = load_tokenizer(model_config)
    data = load_lm_clients(DataConfig(seq_len=64, num_clients=24, max_samples_per_client=40), tokenizer)
    tokens = torch.cat([torch.as_tensor(c.splits["train"]) for c in data.clients])
    needed = args.batches * args.batch_size
    batches = [lm_batch(tokens[i : i + args.batch_size].numpy()).to(device) for i in range(0, needed, args.batch_size)]
    results = {}
    for name, adapter in SETUPS.items():
        results[name] = measure(model_config, adapter, batches, tokens, args)
        print(name, json.dumps(results[name], indent=1), flush=True)
    prefix = "gpu" if device.type == "cuda" else "cpu"
    report = {
        "setup": {
            "model": "SmolLM2-135M architecture, random weights" if args.random_weights else EMBEDDED_MODEL,
            "device": args.device,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "seq_len": 64,
            "samples_timed": needed,
            "naive_samples": args.naive_samples,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "buffer_mb": args.buffer_mb,
        },
        "results": results,
        # the headline figures are the worse of the two setups
        f"{prefix}_time_ratio_to_plain": max(r["time_ratio_to_plain"] for r in results.values()),
        f"{prefix}_speedup_vs_naive": min(r["speedup_vs_naive"] for r in results.values()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Sketch engine benchmark ({args.device}, {args.dtype}, batch {args.batch_size} x 64 tokens, d = {args.dim})",
        "",
        "| setup | p | engine s/sample | plain s/sample | naive s/sample | engine / plain | speed-up vs naive "
        "| peak RSS MB engine / plain | engine peak RSS MB at d / 4d | P if stored, MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['p']:,} | {r['engine_s_per_sample']:.4f} | {r['plain_s_per_sample']:.4f} | "
            f"{r['naive_s_per_sample']:.4f} | {r['time_ratio_to_plain']:.3f} | {r['speedup_vs_naive']:.2f}x | "
            f"{r['peak_rss_mb']['engine']:.0f} / {r['peak_rss_mb']['plain']:.0f} | "
            + " / ".join(f"{v:.0f}" for v in r["engine_peak_rss_mb_by_d_on_32_samples"].values())
            + f" | {r['projection_matrix_mb_if_stored']:.0f} |"
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"written to {RESULTS / args.out}.json and .md")


if __name__ == "__main__":
    main()
