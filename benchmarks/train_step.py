"""One MetaTuner-J training step vs one static LoRA SFT step on the same batch: time and peak memory.

    .venv/bin/python benchmarks/train_step.py [--model smollm2-135m] [--batch-size 4] [--rollouts 4]
                                              [--repeats 3] [--out results/bench/train_step.json]

Time: the steps run in one process, interleaved (SFT, J, J amortized, SFT, ...) after one untimed
warm-up, so machine noise hits all alike; medians and ratios are printed. The J step is the trainer's
own ``train_step`` with rollouts every step and the frozen-decoder prompt cache cleared before each
step, i.e. the most expensive step the loop can take; "J amortized" runs ``--rollout-every`` steps with
rollouts on the first only (``train.rollout_every``) and reports the cost per step.

Memory: each variant runs again in a fresh subprocess (two steps) while a thread samples the resident
set size every 5 ms, after the model is loaded (so the load's own transient peak is not counted); the ratio J / SFT shows what G's adapters, F, rollouts and activations add on top of the single
shared copy of the base weights. Targets from the issue: time <= 2.5x, memory <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    from metatuner.training.build import build_metatuner
    from metatuner.tasks import get_task
    from metatuner.training.trainer import Trainer

    cfg = load_config(None, [
        f"train.batch_size={args.batch_size}", f"train.rollouts={args.rollouts}", "train.rollout_every=1",
        f"train.steps={10 ** 6}", "train.sync_every=1000000", f"generator.max_prompt_tokens={args.prompt_tokens}",
    ])
    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu")
    mt = build_metatuner(cfg, model, tok)
    mt.add_static_adapter(8, 16.0)
    task = get_task("arithmetic")
    batch = task.load("train")[: args.batch_size]
    trainer = Trainer(cfg, mt, task, batch, [], Path(tempfile.mkdtemp()), progress=False)
    trainer.setup_joint()
    static = list(mt.m_lora.adapter_parameters("static"))
    sft_opt = torch.optim.AdamW(static, lr=1e-4)

    def sft_step():
        for p in static:
            p.requires_grad_(True)
        loss = mt.answer_nll(task, batch, [task.instruction] * len(batch), None).mean()
        loss.backward()
        sft_opt.step()
        sft_opt.zero_grad(set_to_none=True)
        for p in static:
            p.requires_grad_(False)

    def joint_step():
        trainer.tc.rollout_every = 1
        trainer.prompt_cache.clear()
        trainer.stream.cursor = 0  # the same batch every time
        trainer.train_step()

    def joint_amortized():
        """``args.rollout_every`` steps with rollouts on the first only, reported per step."""
        trainer.tc.rollout_every = args.rollout_every
        trainer.step = 0
        for _ in range(args.rollout_every):
            trainer.prompt_cache.clear()
            trainer.stream.cursor = 0
            trainer.train_step()

    return {"sft": sft_step, "joint": joint_step, "joint_amortized": joint_amortized}


def measure_memory(args, variant: str) -> None:
    """Peak resident memory while two steps run (sampled every 5 ms), after the model is loaded."""
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
    print(json.dumps({"peak_rss_mb": peak[0] / 2**20, "loaded_rss_mb": baseline / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32, help="generator.max_prompt_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rollout-every", type=int, default=4, help="for the amortized J step")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--memory-of", choices=["sft", "joint"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_of:
        return measure_memory(args, args.memory_of)

    steps = build(args)
    times = {"sft": [], "joint": [], "joint_amortized": []}
    for name in ("sft", "joint"):
        steps[name]()  # warm-up, untimed
    for _ in range(args.repeats):
        for name in times:
            start = time.perf_counter()
            steps[name]()
            per = args.rollout_every if name == "joint_amortized" else 1
            times[name].append((time.perf_counter() - start) / per)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {}
    for name in ("sft", "joint"):
        cmd = [sys.executable, __file__, "--memory-of", name, "--model", args.model, "--batch-size",
               str(args.batch_size), "--rollouts", str(args.rollouts), "--prompt-tokens", str(args.prompt_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        mem[name] = json.loads(out)
    result = {
        "model": args.model, "batch_size": args.batch_size, "rollouts": args.rollouts,
        "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "seconds": times, "median_seconds": med,
        "time_ratio": med["joint"] / med["sft"], "time_ratio_amortized": med["joint_amortized"] / med["sft"],
        "rollout_every": args.rollout_every, "memory": mem,
        "memory_ratio": mem["joint"]["peak_rss_mb"] / mem["sft"]["peak_rss_mb"],
    }
    print(f"SFT step   median {med['sft']:.2f}s   peak RSS {mem['sft']['peak_rss_mb']:.0f} MB "
          f"(model loaded: {mem['sft']['loaded_rss_mb']:.0f} MB)")
    print(f"J step     median {med['joint']:.2f}s   peak RSS {mem['joint']['peak_rss_mb']:.0f} MB "
          f"(model loaded: {mem['joint']['loaded_rss_mb']:.0f} MB)")
    print(f"J step, rollouts every {args.rollout_every} steps: median {med['joint_amortized']:.2f}s per step")
    print(f"time ratio J/SFT   {result['time_ratio']:.2f}x  (target <= 2.5x); "
          f"amortized {result['time_ratio_amortized']:.2f}x")
    print(f"memory ratio J/SFT {result['memory_ratio']:.2f}x  (target <= 1.3x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
