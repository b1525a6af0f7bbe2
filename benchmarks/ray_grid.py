"""Wall time of one small grid on the two backends: local worker processes (``--workers 2``) and Ray tasks on a
local cluster of 2 CPUs (``--backend ray``), interleaved, with the cluster's start-up timed on its own.

    .venv/bin/python benchmarks/ray_grid.py [--model smollm2-135m] [--steps 4] [--limit 8] [--repeats 3]
        [--out results/bench/ray_grid.json]

The grid: the ``arithmetic`` task, seed 0, zero-shot and SFT (``--steps`` steps of batch 2), each scored on
``--limit`` test items, a checkpoint every step; each repeat writes a fresh grid folder (nothing to resume).
Repeats alternate local, Ray, local, Ray, ...; the first Ray repeat starts with fresh worker processes
(each imports torch, transformers and metatuner), the later ones reuse them, so Ray's numbers are given for
the first repeat and for the rest. Every repeat's rows must equal the first local repeat's (timing fields
aside), or the benchmark exits 1. Timing is never a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TIMING = {"eval_seconds", "fit_seconds", "environment"}


def protocol(folder: Path, model: str, steps: int, limit: int) -> Path:
    import yaml

    path = folder / "protocol.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ray-grid-bench", "tasks": ["arithmetic"], "seeds": [0],
        "methods": {"zero-shot": {}, "sft": {"train.steps": steps}},
        "common": {"model": {"name": model}, "eval": {"limit": limit, "max_new_tokens": 16, "batch_size": 4},
                   "data": {"train_limit": 16, "val_size": 2},
                   "train": {"batch_size": 2, "save_every": 1}},
    }))
    return path


def rows_without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def spread(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="repeats of each backend (interleaved)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    import ray

    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol

    root = Path(tempfile.mkdtemp(prefix="ray-grid-"))
    spec = Protocol.load(protocol(root, args.model, args.steps, args.limit))
    times: dict[str, list[float]] = {"local": [], "ray": []}
    reference = None
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster_start = time.perf_counter() - started
    print(f"ray cluster start: {cluster_start:.1f}s", flush=True)
    try:
        for k in range(args.repeats):
            for backend in ("local", "ray"):
                out = root / f"{backend}-{k}"
                began = time.perf_counter()
                rows = run_grid(spec, out, workers=2, backend=backend)
                seconds = time.perf_counter() - began
                times[backend].append(seconds)
                reference = reference if reference is not None else rows_without_timing(rows)
                same = rows_without_timing(rows) == reference
                print(f"repeat {k} {backend:5s} {seconds:7.1f}s  rows {'equal' if same else 'DIFFER'}", flush=True)
                if not same:
                    return 1
    finally:
        ray.shutdown()
    result = {
        "model": args.model, "steps": args.steps, "limit": args.limit, "cluster_start_seconds": cluster_start,
        "local_workers_2": spread(times["local"]), "ray_first": times["ray"][0],
        "ray_warm": spread(times["ray"][1:]) if len(times["ray"]) > 1 else None,
        "seconds": times,
    }
    print(f"local --workers 2: min {min(times['local']):.1f}s  median {statistics.median(times['local']):.1f}s  "
          f"max {max(times['local']):.1f}s")
    print(f"ray, fresh workers: {times['ray'][0]:.1f}s (after the cluster's {cluster_start:.1f}s start)")
    if len(times["ray"]) > 1:
        warm = times["ray"][1:]
        print(f"ray, warm workers:  min {min(warm):.1f}s  median {statistics.median(warm):.1f}s  max {max(warm):.1f}s"
              f"  ({statistics.median(warm) / statistics.median(times['local']):.2f}x local's median)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
