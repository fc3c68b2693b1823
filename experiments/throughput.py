"""Throughput on CPU: fp32 against the default compute dtype, pass by pass and end to end.

Three stages, each measured side by side in one run of this script (resumable: a finished
pipeline run is skipped on restart, so a killed benchmark continues where it stopped):

- ``passes``: SmolLM2-135M with the default LoRA adapter on real Shakespeare samples of
  the demo preset (64 tokens). Per sample: a training step (batch ``train.batch_size``), an
  evaluation pass and a sketch pass (batch ``sketch.batch_size``), each in fp32 and in
  bf16 autocast, alternating the two ``--reps`` times and keeping the fastest, at 1 and 2
  torch threads. The losses of the same steps and the sketches are compared. Also: nf4
  training with and without autocast (``auto`` leaves nf4 alone), and evaluation batches.
- ``pipeline``: the demo preset end to end through ``elora-fed run``: the code before
  this benchmark (commit ``BEFORE``, in its own ``git worktree``: fp32, 2 actors x 1 thread),
  the new default (``model.compute_dtype = auto``), and the default with 1 actor x 2
  threads (``federation.cpus_per_client = 2``). The affinity matrices and groups of the
  first two compare fp32 sketches with bf16 ones (the sketch code is the same in fp32).
- ``overhead_epochs`` per pipeline run, from its own ``accounting.json``: EnsembleLoRA's
  FLOPs beyond what one-adapter FedAvg spends on the same run (sketch, boosting, weights,
  and the test's extra groups), over the FLOPs of one training epoch over every client's
  train split.

    python experiments/throughput.py [--stage passes|pipeline|all] [--reps 3]

Writes ``experiments/results/throughput.{json,md}``; pipeline run directories go under
``runs/throughput/`` and their summaries under ``experiments/results/throughput_runs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elora_fed.config import RunConfig, load_config
from elora_fed.data.federated_data import load_clients
from elora_fed.ensemble.outputs import adapter_outputs
from elora_fed.model.adapters import adapter_state, attach_lora, load_adapter_state
from elora_fed.model.batches import Batch, client_batches
from elora_fed.model.compute import compute_context, resolve_compute_dtype
from elora_fed.model.config import ModelConfig
from elora_fed.model.models import load_base_model, load_tokenizer
from elora_fed.model.training import target_log_loss, train_adapter
from elora_fed.sketch.client_sketch import sketch_setup
from elora_fed.sketch.gradients import sketch_batches

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
RUN_SUMMARIES = RESULTS / "throughput_runs"
RUNS = ROOT / "runs" / "throughput"
BEFORE = "5d3f91c"  # the last commit before the compute dtype: fp32, 2 actors x 1 thread
PIPELINES: dict[str, tuple[str | None, dict[str, Any]]] = {
    # name: (the commit to run, or None for this checkout; the overrides of the demo preset)
    "before": (BEFORE, {}),
    "default_2x1": (None, {}),
    "default_1x2": (None, {"federation.cpus_per_client": 2.0}),
}
TRAIN_STEPS = 6
PASS_SAMPLES = 48


def autocast(dtype: str) -> contextlib.AbstractContextManager[object]:
    """The pipeline's own compute context (``elora_fed.model.compute``) for ``dtype``."""
    return compute_context(ModelConfig(compute_dtype=dtype, device="cpu"))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def demo_batches(config: RunConfig, batch_size: int) -> list[Batch]:
    """The first ``PASS_SAMPLES`` train samples of the demo's clients, in batches."""
    tokenizer = load_tokenizer(config.model)
    batches: list[Batch] = []
    for client in load_clients(config.data, tokenizer):
        batches += [b for _, b in client_batches(client, "train", batch_size, tokenizer.pad_token_id)]
        if sum(len(b) for b in batches) >= PASS_SAMPLES:
            break
    return batches


def measure_passes(config: RunConfig, reps: int) -> dict[str, Any]:
    """Seconds per sample and result differences, fp32 against bf16 autocast, at 1 and 2 threads."""
    model = attach_lora(load_base_model(config.model), config.adapter)
    theta_star = adapter_state(model)
    train_b = demo_batches(config, config.train.batch_size)
    eval_b = demo_batches(config, config.sketch.batch_size)
    projector, _ = sketch_setup(model, config)
    n_train = TRAIN_STEPS * len(train_b[0])
    n_eval = sum(len(b) for b in eval_b)

    def train(dtype: str) -> list[float]:
        load_adapter_state(model, theta_star)
        with autocast(dtype):
            return train_adapter(model, train_b, TRAIN_STEPS, config.train.lr, 0, target_log_loss)

    def evaluate(dtype: str, batches: list[Batch] = eval_b) -> float:
        with autocast(dtype):
            return adapter_outputs(model, batches, theta_star).loss()

    def sketch(dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        load_adapter_state(model, theta_star)
        with autocast(dtype):
            s = sketch_batches(model, eval_b, projector, config.sketch.buffer_mb)
        return s.outputs, s.features

    result: dict[str, Any] = {
        "model": config.model.name,
        "samples": {"train": n_train, "eval": n_eval, "sketch": n_eval},
        "threads": {},
    }
    for threads in (1, 2):
        best: dict[str, dict[str, float]] = {}
        outs: dict[tuple[str, str], Any] = {}
        with torch_threads(threads):
            for _ in range(reps):
                for dtype in ("fp32", "bf16"):
                    for name, fn, n in (
                        ("train", lambda d=dtype: train(d), n_train),
                        ("eval", lambda d=dtype: evaluate(d), n_eval),
                        ("sketch", lambda d=dtype: sketch(d), n_eval),
                    ):
                        seconds, out = timed(fn)
                        slot = best.setdefault(name, {})
                        slot[dtype] = min(slot.get(dtype, float("inf")), seconds / n)
                        outs[(name, dtype)] = out
                    print(f"[throughput] {threads} thread(s), {dtype}: {best}", flush=True)
        losses32, losses16 = np.array(outs[("train", "fp32")]), np.array(outs[("train", "bf16")])
        h32, f32 = outs[("sketch", "fp32")]
        h16, f16 = outs[("sketch", "bf16")]
        result["threads"][str(threads)] = {
            "seconds_per_sample": best,
            "speedup": {k: v["fp32"] / v["bf16"] for k, v in best.items()},
            "train_losses": {"fp32": losses32.tolist(), "bf16": losses16.tolist()},
            "train_loss_max_abs_diff": float(np.abs(losses32 - losses16).max()),
            "eval_loss": {"fp32": outs[("eval", "fp32")], "bf16": outs[("eval", "bf16")]},
            "eval_loss_abs_diff": abs(outs[("eval", "fp32")] - outs[("eval", "bf16")]),
            "sketch_b_max_abs_diff": float((h32 - h16).abs().max()),
            "sketch_features_relative_error": float((f32 - f16).norm() / f32.norm()),
        }
    with torch_threads(1):
        sizes = {}
        for size in (config.sketch.batch_size, 4 * config.sketch.batch_size):
            batches = demo_batches(config, size)
            n = sum(len(b) for b in batches)
            sizes[str(size)] = min(timed(lambda b=batches: evaluate("bf16", b))[0] for _ in range(reps)) / n
        result["eval_batch_size_seconds_per_sample_bf16_1thread"] = sizes
        nf4 = attach_lora(load_base_model(dataclasses.replace(config.model, precision="nf4")), config.adapter)
        nf4_theta = adapter_state(nf4)
        nf4_steps = 2
        rows = {}
        for dtype in ("fp32", "bf16"):
            load_adapter_state(nf4, nf4_theta)
            with autocast(dtype):
                seconds, losses = timed(
                    lambda: train_adapter(nf4, train_b, nf4_steps, config.train.lr, 0, target_log_loss)
                )
            rows[dtype] = {"seconds_per_sample": seconds / (nf4_steps * len(train_b[0])), "losses": losses}
        result["nf4_train_1thread"] = rows
    return result


def checkout(commit: str | None) -> Path:
    """This checkout, or a detached ``git worktree`` of ``commit`` (made once)."""
    if commit is None:
        return ROOT
    tree = RUNS / f"worktree-{commit}"
    if not (tree / "elora_fed").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], check=True, cwd=ROOT)
    return tree


def run_pipeline(name: str, commit: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """One demo run through the CLI of ``commit`` (skipped if its summary exists); its phases, FLOPs and losses."""
    summary_path = RUN_SUMMARIES / f"{name}.json"
    if summary_path.exists():
        print(f"[throughput] {name}: done, skipped", flush=True)
        return dict(json.loads(summary_path.read_text()))
    out = RUNS / name
    out.mkdir(parents=True, exist_ok=True)
    sets = [f"run_dir='{out}'", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    tree = checkout(commit)
    command = [sys.executable, "-c", "from elora_fed.cli import main; main()", "run", "--preset", "demo"]
    for assignment in sets:
        command += ["--set", assignment]
    print(f"[throughput] {name} (at {commit or 'this checkout'}): {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the checkout's packages, in the CLI and in the Ray workers
    subprocess.run(command, check=True, cwd=tree, env=env)
    wall = time.perf_counter() - start
    run_dir = max(out.glob("pipeline-*"), key=lambda p: p.stat().st_mtime)
    report = json.loads((run_dir / "report.json").read_text())
    accounting = json.loads((run_dir / "accounting.json").read_text())
    clients = json.loads((run_dir / "clients.json").read_text())
    summary = {
        "commit": commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "overrides": overrides,
        "wall_s": wall,
        "phase_seconds": report["seconds"],
        "average": report["average"],
        "num_groups": report["num_groups"],
        "boosts": report["boosts"],
        "overhead_epochs": overhead_epochs(accounting, clients, report),
    }
    RUN_SUMMARIES.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def sketch_agreement(reference: str, other: str) -> dict[str, Any]:
    """How far bf16 sketches move what they decide: the affinity matrices and groups of two demo runs."""
    dirs = [max((RUNS / name).glob("pipeline-*"), key=lambda p: p.stat().st_mtime) for name in (reference, other)]
    first, second = (np.load(d / "affinity.npy") for d in dirs)
    off = ~np.eye(len(first), dtype=bool)
    labels = []
    for d in dirs:
        grouping = json.loads((d / "groups.json").read_text())
        by_client = dict(zip(grouping["clients"], grouping["labels"], strict=True))
        labels.append(np.array([by_client[c] for c in sorted(by_client)]))
    same = [np.equal.outer(lab, lab)[off] for lab in labels]
    return {
        "runs": [reference, other],
        "affinity_correlation": float(np.corrcoef(first[off], second[off])[0, 1]),
        "affinity_relative_difference": float(np.linalg.norm(first - second) / np.linalg.norm(first)),
        "group_sizes": [sorted(np.bincount(lab).tolist(), reverse=True) for lab in labels],
        "rand_index": float(np.mean(same[0] == same[1])),
    }


def overhead_epochs(
    accounting: dict[str, Any], clients: list[dict[str, Any]], report: dict[str, Any]
) -> dict[str, float]:
    """EnsembleLoRA's FLOPs beyond one-adapter FedAvg, in epochs of training over all train splits.

    One epoch: a forward and a backward of every train token. One-adapter FedAvg tests one
    adapter and theta* (``with-base``): two forwards of every test token; the rest of the
    test phase is the ensemble's.
    """
    size = accounting["model"]
    seq_len = int(report["config"]["data.seq_len"])
    train_tokens = sum(c["train"] for c in clients) * seq_len
    test_tokens = sum(c["test"] for c in clients) * seq_len
    forward, backward = 2.0 * size["base_params"], 2.0 * size["base_params"] + 2.0 * size["adapter_params"]
    epoch = (forward + backward) * train_tokens
    phases = accounting["phases"]
    extra = {p: phases[p]["flops"]["total"] / epoch for p in ("sketch", "boost", "weights") if p in phases}
    extra["test"] = max(0.0, phases["test"]["flops"]["total"] - 2 * forward * test_tokens) / epoch
    return {**extra, "total": sum(extra.values())}


def matmul_probe(size: int = 512, reps: int = 5) -> dict[str, Any]:
    """One thread's matmul time in fp32 and bf16, and the dtype ``model.compute_dtype = "auto"`` picks.

    Where bf16 has no native kernels (an AVX2 CPU) it is emulated and many times slower,
    which is why ``auto`` keeps fp32 there; this probe shows the ratio on any machine in a
    second, where the passes stage would take hours in emulated bf16.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            ms[name] = (time.perf_counter() - start) / reps * 1e3
    finally:
        torch.set_num_threads(previous)
    auto = resolve_compute_dtype(ModelConfig())
    return {
        "size": size,
        "fp32_ms": ms["fp32"],
        "bf16_ms": ms["bf16"],
        "bf16_over_fp32": ms["bf16"] / ms["fp32"],
        "auto": auto,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("probe", "passes", "pipeline", "all"), default="all")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name of the passes stage")
    parser.add_argument("--out", default="throughput", help="results file stem")
    args = parser.parse_args()
    path = RESULTS / f"{args.out}.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result["machine"] = {
        "cpu": torch.cpu.get_capabilities().get("cpu_name"),
        "cores": os.cpu_count(),
        "avx512_bf16": bool(torch.cpu.get_capabilities().get("avx512_bf16")),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    config = load_config("demo", {"model.name": args.model})
    result["probe"] = matmul_probe()
    if args.stage in ("passes", "all"):
        result["passes"] = measure_passes(config, args.reps)
        one = result["passes"]["threads"]["1"]["speedup"]
        result.update(train_speedup=one["train"], eval_speedup=one["eval"], sketch_speedup=one["sketch"])
    if args.stage in ("pipeline", "all"):
        result["pipeline"] = {name: run_pipeline(name, commit, o) for name, (commit, o) in PIPELINES.items()}
        runs = result["pipeline"]
        result["demo_speedup"] = runs["before"]["wall_s"] / runs["default_2x1"]["wall_s"]
        result["overhead_epochs"] = runs["default_2x1"]["overhead_epochs"]["total"]
        result["sketch_agreement"] = sketch_agreement("before", "default_2x1")  # fp32 sketches against bf16
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Throughput: fp32 against the default compute dtype",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, AVX-512 BF16 {r['machine']['avx512_bf16']}, "
        f"torch {r['machine']['torch']}. Written by `experiments/throughput.py`.",
    ]
    if "probe" in r:
        p = r["probe"]
        lines += [
            "",
            f"Matmul probe ({p['size']}x{p['size']}, 1 thread): fp32 {p['fp32_ms']:.1f} ms, bf16 {p['bf16_ms']:.1f} ms "
            f"({p['bf16_over_fp32']:.2f}x fp32's time); `model.compute_dtype = auto` picks {p['auto']} here.",
        ]
    if "passes" in r:
        p = r["passes"]
        lines += [
            "",
            f"## Passes ({p['model']}, LoRA r=4 q,v, 64-token Shakespeare samples; {p['samples']['train']} "
            f"training samples, {p['samples']['eval']} evaluated and sketched; fastest of the repetitions)",
            "",
            "| threads | pass | fp32 s/sample | bf16 s/sample | speedup |",
            "| --- | --- | --- | --- | --- |",
        ]
        for threads, t in p["threads"].items():
            for name, s in t["seconds_per_sample"].items():
                lines.append(f"| {threads} | {name} | {s['fp32']:.4f} | {s['bf16']:.4f} | {t['speedup'][name]:.2f}x |")
        lines += [
            "",
            "| threads | train loss, max abs diff over steps | eval loss diff | sketch b max diff | sketch features rel. error |",
        ]
        lines.append("| --- | --- | --- | --- | --- |")
        for threads, t in p["threads"].items():
            lines.append(
                f"| {threads} | {t['train_loss_max_abs_diff']:.2e} | {t['eval_loss_abs_diff']:.2e} | "
                f"{t['sketch_b_max_abs_diff']:.2e} | {t['sketch_features_relative_error']:.2e} |"
            )
        sizes = p["eval_batch_size_seconds_per_sample_bf16_1thread"]
        nf4 = p["nf4_train_1thread"]
        lines += [
            "",
            "Evaluation batch size (bf16, 1 thread), s/sample: "
            + ", ".join(f"{k}: {v:.4f}" for k, v in sizes.items())
            + ".",
            f"nf4 training step (1 thread), s/sample: fp32 compute {nf4['fp32']['seconds_per_sample']:.3f}, "
            f"under bf16 autocast {nf4['bf16']['seconds_per_sample']:.3f}.",
        ]
    if "pipeline" in r:
        runs = r["pipeline"]
        phases = [
            p for p in ("sketch", "groups", "train", "boost", "weights", "test") if p in runs["before"]["phase_seconds"]
        ]
        lines += [
            "",
            "## The demo preset end to end (`elora-fed run --preset demo`, wall seconds per phase)",
            "",
            "| run | commit | " + " | ".join(phases) + " | wall | test loss (ensemble) | overhead epochs |",
            "| --- | --- | " + " | ".join("---" for _ in phases) + " | --- | --- | --- |",
        ]
        for name, s in runs.items():
            lines.append(
                f"| {name} | {s['commit']} | "
                + " | ".join(f"{s['phase_seconds'].get(ph, 0):.1f}" for ph in phases)
                + f" | {s['wall_s']:.1f} | {s['average']['ensemble']['test_loss']:.4f} | {s['overhead_epochs']['total']:.2f} |"
            )
        lines += [
            "",
            "Overhead epochs by phase (default): "
            + ", ".join(f"{k} {v:.2f}" for k, v in runs["default_2x1"]["overhead_epochs"].items())
            + ".",
            "",
            f"demo_speedup = {r['demo_speedup']:.2f}x; overhead_epochs = {r['overhead_epochs']:.2f}.",
        ]
        agree = r["sketch_agreement"]
        lines += [
            "",
            f"Sketches in bf16 against fp32 ({agree['runs'][0]} against {agree['runs'][1]}): affinity matrices "
            f"correlated {agree['affinity_correlation']:.3f} (relative difference "
            f"{agree['affinity_relative_difference']:.3f}); group sizes {agree['group_sizes'][0]} against "
            f"{agree['group_sizes'][1]}, Rand index {agree['rand_index']:.3f} (1: the same groups).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
