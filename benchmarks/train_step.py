"""Training steps of SFT, w/o P, MetaTuner-J with its prompt branch active, and J once the branch has
retired: time per step, where it goes, and memory above the loaded model.

    .venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--batch-size 4] [--rollouts 4]
                                              [--rollout-queries N] [--repeats 5] [--window 4]
                                              [--gradient-checkpointing] [--autocast bf16]
                                              [--out results/bench/train_step.json]

Variants, each run by the trainer's own code on the built-in task with the shipped defaults
(``generator.mode=append``, 16-token prompt cap, rollouts every 2 joint steps), each on its own copy of
the model:

- ``sft``: one step of the SFT baseline (``Trainer.warmup_actor``: static LoRA on (p~, x) -> y);
- ``wop``: ``--window`` joint steps of w/o P (``train.ablation=no_prompt``): F, the shared encoder and the
  static LoRA on the task loss under p~;
- ``joint_active``: ``--window`` consecutive J steps from a sync, with the prompt branch active
  (rollouts on every other step, frozen prompts decoded once for the window), reported per step;
- ``joint_retired``: ``--window`` J steps after the prompt branch has retired itself
  (``train.prompt_branch=auto``): no rollouts, regularizer or prompt decoding.

Time: the variants run interleaved in one process (sft, wop, joint_active, joint_retired, sft, ...)
after one untimed warm-up of each, so machine noise hits all alike; min / median / max per step and the
ratios of medians are printed, with the median step split into its parts (the trainer's
``part_seconds``): ``encode`` (meta encoder + F, forward), ``decode`` (G's prompts: rollout samples and
frozen-decoder prompts), ``score`` (rollout rewards: M's no-grad passes over every candidate), ``task``
(M's task loss, forward and backward, including the backward through F and the encoder), ``reg`` (G's
regularizer, forward and backward), and ``other`` (optimizer step, clipping, bookkeeping). Memory: each
variant runs again in a fresh subprocess while a thread samples the resident set size every 5 ms; what
counts is the peak *above* the RSS with the model loaded and the trainer built (so the base weights are
not in the ratio). Targets (issue 21): J active <= 2.5x SFT, J retired <= 1.1x w/o P, w/o P <= 1.4x SFT,
memory above the model <= 1.3x SFT's. Timing is never a pass/fail test. ``--gradient-checkpointing`` runs
every variant with ``train.gradient_checkpointing=true`` (compare its memory and time with a run without);
``--autocast bf16`` runs every variant's forward passes under bf16 autocast (``train.autocast``; the weights
stay fp32), for CPUs with avx512_bf16 or AMX.
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

VARIANTS = ("sft", "wop", "joint_active", "joint_retired")
PARTS = ("encode", "decode", "score", "task", "reg")


def build(args, only: str | None = None):
    """One step function per variant (``only``: just that one), each with its own model and trainer; and
    a function giving each trainer's ``part_seconds`` so far."""
    from metatuner.config import load_config
    from metatuner.models.loading import load_model
    from metatuner.tasks import get_task
    from metatuner.training.build import build_metatuner
    from metatuner.training.trainer import Trainer

    task = get_task("arithmetic")
    train = task.load("train")[:512]

    def trainer_for(*overrides: str) -> Trainer:
        cfg = load_config(None, [
            f"train.batch_size={args.batch_size}", f"train.rollouts={args.rollouts}", "train.steps=1000000",
            "train.actor_warmup_steps=0", "train.generator_warmup_steps=0", "data.val_size=0",
            f"train.sync_every={args.window}",
            *([f"train.rollout_queries={args.rollout_queries}"] if args.rollout_queries else []),
            *(["train.gradient_checkpointing=true"] if args.gradient_checkpointing else []),
            *([f"train.autocast={args.autocast}"] if args.autocast else []), *overrides,
        ])
        torch.manual_seed(0)
        model, tok = load_model(args.model, device="cpu")
        mt = build_metatuner(cfg, model, tok)
        mt.add_static_adapter(cfg.train.static_rank, cfg.train.static_alpha)
        trainer = Trainer(cfg, mt, task, train, [], Path(tempfile.mkdtemp()), progress=False)
        trainer.setup_optimizer(cfg.train.steps)
        return trainer

    def window(trainer: Trainer):
        def run():
            """A fresh sync window on new queries: no frozen prompt cached, the first step a rollout step."""
            trainer.prompt_cache.clear()
            trainer.step = trainer.joint_start = 0
            for _ in range(args.window):
                trainer.train_step()
        return run

    steps, trainers = {}, {}
    if only in (None, "sft"):
        sft = trainers["sft"] = trainer_for()
        sft.setup_optimizer(sft.tc.steps, {"static": list(sft.mt.m_lora.adapter_parameters("static"))})
        steps["sft"] = lambda: sft.warmup_actor(1)
    if only in (None, "wop"):
        trainers["wop"] = trainer_for("train.ablation=no_prompt")
        steps["wop"] = window(trainers["wop"])
    if only in (None, "joint_active"):
        trainers["joint_active"] = trainer_for("train.prompt_branch=always")
        steps["joint_active"] = window(trainers["joint_active"])
    if only in (None, "joint_retired"):
        retired = trainers["joint_retired"] = trainer_for()
        retired.retire("benchmark: retired before the first step")
        steps["joint_retired"] = window(retired)
    return steps, lambda name: dict(trainers[name].part_seconds)


def measure_memory(args, variant: str) -> None:
    """Peak resident memory above the loaded model while the variant runs twice (sampled every 5 ms)."""
    import gc
    import threading

    import psutil

    steps, _ = build(args, only=variant)
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
    p.add_argument("--rollout-queries", type=int, default=None,
                   help="train.rollout_queries: queries of each batch rolled out (default: all)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                   help="train.autocast in every variant (default: the config's, off for this fp32 model)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="train.gradient_checkpointing=true in every variant (G's and M's blocks recomputed in backward)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return measure_memory(args, args.memory_of)

    steps, parts_of = build(args)
    per = {"sft": 1, "wop": args.window, "joint_active": args.window, "joint_retired": args.window}
    times: dict[str, list[float]] = {name: [] for name in steps}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for name in steps:
        steps[name]()  # warm-up, untimed
    for _ in range(args.repeats):
        for name in steps:
            before = parts_of(name)
            start = time.perf_counter()
            steps[name]()
            took = (time.perf_counter() - start) / per[name]
            times[name].append(took)
            after = parts_of(name)
            split = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / per[name] for k in PARTS}
            if name == "sft":  # SFT's whole step is M's task pass and its optimizer step
                split["task"] = took
            split["other"] = max(0.0, took - sum(split.values()))
            parts[name].append(split)
    stats = {k: spread(v) for k, v in times.items()}
    med = {k: v["median"] for k, v in stats.items()}
    # the parts of the repeat whose time is the median (a consistent split, not a median of each part)
    median_parts = {k: parts[k][sorted(range(len(v)), key=v.__getitem__)[len(v) // 2]] for k, v in times.items()}
    mem = {}
    if not args.no_memory:
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--memory-of", name, "--model", args.model, "--batch-size",
                   str(args.batch_size), "--rollouts", str(args.rollouts), "--window", str(args.window)]
            if args.rollout_queries:
                cmd += ["--rollout-queries", str(args.rollout_queries)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.gradient_checkpointing:
                cmd += ["--gradient-checkpointing"]
            if args.autocast:
                cmd += ["--autocast", args.autocast]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            mem[name] = json.loads(out)
    ratios = {"joint_active/sft": med["joint_active"] / med["sft"], "joint_retired/wop": med["joint_retired"] / med["wop"],
              "wop/sft": med["wop"] / med["sft"]}
    targets = {"joint_active/sft": 2.5, "joint_retired/wop": 1.1, "wop/sft": 1.4}
    if mem:
        for name in ("wop", "joint_active", "joint_retired"):
            ratios[f"memory {name}/sft"] = mem[name]["above_model_mb"] / mem["sft"]["above_model_mb"]
            targets[f"memory {name}/sft"] = 1.3
    result = {
        "model": args.model, "batch_size": args.batch_size, "rollouts": args.rollouts, "window": args.window,
        "rollout_queries": args.rollout_queries, "gradient_checkpointing": args.gradient_checkpointing,
        "autocast": args.autocast,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "seconds": times, "stats": stats,
        "parts": parts, "median_parts": median_parts, "ratios": ratios, "targets": targets, "memory": mem,
    }
    for name, st in stats.items():
        split = "  ".join(f"{k} {v:.2f}" for k, v in median_parts[name].items() if v > 0.005)
        print(f"{name:14s} per step  min {st['min']:.2f}s  median {st['median']:.2f}s  max {st['max']:.2f}s   [{split}]")
    for k, v in ratios.items():
        print(f"{k:28s} {v:.2f}x  (target <= {targets[k]}x: {'met' if v <= targets[k] else 'missed'})")
    for name, m in mem.items():
        print(f"memory above the loaded model, {name}: {m['above_model_mb']:.0f} MB (whole process {m['peak_rss_mb']:.0f} MB)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
