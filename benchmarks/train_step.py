"""MetaTuner-J training steps vs static LoRA SFT steps on the same data: time and memory above the model.

    .venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--batch-size 4] [--rollouts 4]
                                              [--repeats 5] [--window 4] [--out results/bench/train_step.json]

Variants, each run by the trainer's own code on the built-in task with the shipped defaults
(``generator.mode=append``, 16-token prompt cap, rollouts every 2 joint steps, sync every 4):

- ``sft``: one step of the SFT baseline (``Trainer.warmup_actor``: static LoRA on (p~, x) -> y);
- ``joint_rollout``: one MetaTuner-J step with rollouts (``--rollouts`` samples per query) whose
  frozen-decoder prompts are not cached yet: the most expensive step the loop takes;
- ``joint_window``: ``--window`` consecutive J steps from a sync (rollouts on every other one, frozen
  prompts decoded once for the window), reported per step: what a step costs in a real run.

Time: the variants run interleaved in one process (sft, joint_rollout, joint_window, sft, ...) after one
untimed warm-up of each, so machine noise hits all alike; min / median / max per variant and the ratios
of medians are printed. Memory: each variant runs again in a fresh subprocess while a thread samples
the resident set size every 5 ms; what counts is the peak *above* the RSS with the model loaded and the
trainer built (so the shared base weights, loaded once, are not in the ratio). Targets from the issue:
J time <= 2.5x SFT, memory above the model <= 1.3x SFT's. Timing is never a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(args):
    from metatuner.config import load_config
    from metatuner.models.loading import load_model
    from metatuner.tasks import get_task
    from metatuner.training.build import build_metatuner
    from metatuner.training.trainer import Trainer

    cfg = load_config(None, [
        f"train.batch_size={args.batch_size}", f"train.rollouts={args.rollouts}", "train.steps=1000000",
        "train.actor_warmup_steps=0", "train.generator_warmup_steps=0", "data.val_size=0",
    ])
    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu")
    mt = build_metatuner(cfg, model, tok)
    mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
    task = get_task("arithmetic")
    train = task.load("train")[:256]
    trainer = Trainer(cfg, mt, task, train, [], Path(tempfile.mkdtemp()), progress=False)
    trainer.setup_optimizer(cfg.train.steps)
    sft = Trainer(cfg, mt, task, train, [], None, progress=False)
    sft.setup_optimizer(cfg.train.steps, {"static": list(mt.m_lora.adapter_parameters("static"))})
    tc = cfg.train

    def sft_step():
        sft.warmup_actor(1)

    def start_window():
        """A fresh sync window on new queries: no frozen prompt cached, the step a rollout step."""
        trainer.prompt_cache.clear()
        trainer.step = trainer.joint_start = 0
        trainer.stream.cursor += tc.batch_size * args.window

    def joint_rollout():
        start_window()
        trainer.train_step()

    def joint_window():
        start_window()
        for _ in range(args.window):
            trainer.train_step()

    return {"sft": sft_step, "joint_rollout": joint_rollout, "joint_window": joint_window}


def measure_memory(args, variant: str) -> None:
    """Peak resident memory above the loaded model while the variant runs twice (sampled every 5 ms)."""
    import gc
    import threading

    import psutil

    steps = build(args)
    gc.collect()
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak, done = [baseline], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(2):
        steps[variant]()
    done.set()
    sampler.join()
    print(json.dumps({"peak_rss_mb": peak[0] / 2**20, "loaded_rss_mb": baseline / 2**20,
                      "above_model_mb": (peak[0] - baseline) / 2**20}))


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--window", type=int, default=4, help="J steps from one sync to the next (train.sync_every)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--memory-of", choices=["sft", "joint_window"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_of:
        return measure_memory(args, args.memory_of)

    steps = build(args)
    per = {"sft": 1, "joint_rollout": 1, "joint_window": args.window}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name in steps:
        steps[name]()  # warm-up, untimed
    for _ in range(args.repeats):
        for name in steps:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) / per[name])
    stats = {k: spread(v) for k, v in times.items()}
    mem = {}
    for name in ("sft", "joint_window"):
        cmd = [sys.executable, __file__, "--memory-of", name, "--model", args.model, "--batch-size",
               str(args.batch_size), "--rollouts", str(args.rollouts), "--window", str(args.window)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        mem[name] = json.loads(out)
    med = {k: v["median"] for k, v in stats.items()}
    result = {
        "model": args.model, "batch_size": args.batch_size, "rollouts": args.rollouts, "window": args.window,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "seconds": times, "stats": stats,
        "time_ratio_rollout_step": med["joint_rollout"] / med["sft"],
        "time_ratio_per_step": med["joint_window"] / med["sft"], "memory": mem,
        "memory_ratio_above_model": mem["joint_window"]["above_model_mb"] / mem["sft"]["above_model_mb"],
    }
    for name, s in stats.items():
        print(f"{name:14s} per step  min {s['min']:.2f}s  median {s['median']:.2f}s  max {s['max']:.2f}s")
    print(f"time ratio J/SFT per step in a sync window: {result['time_ratio_per_step']:.2f}x (target <= 2.5x); "
          f"a rollout step with nothing cached: {result['time_ratio_rollout_step']:.2f}x")
    print(f"memory above the loaded model: SFT {mem['sft']['above_model_mb']:.0f} MB, "
          f"J {mem['joint_window']['above_model_mb']:.0f} MB: {result['memory_ratio_above_model']:.2f}x "
          f"(target <= 1.3x; whole process {mem['joint_window']['peak_rss_mb']:.0f} vs {mem['sft']['peak_rss_mb']:.0f} MB)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
