"""Rollout prompt sampling: n samples per query sharing one prefill vs prefilling n copies of each query.

    .venv/bin/python benchmarks/rollout_prefill.py [--model smollm2-135m] [--batch-size 4] [--rollouts 4]
                                                   [--prompt-tokens 32] [--repeats 5] [--out FILE.json]

Both variants sample ``--rollouts`` rewrites for each of ``--batch-size`` queries with G (the rollout of
a MetaTuner step); "copies" is the way it was done before (every query's rewrite text repeated n times,
all prefilled), "shared" is ``MetaTuner.generate_prompts`` now (each text prefilled once, its KV cache
repeated for the samples). The two run interleaved in one process after an untimed warm-up; medians
and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from metatuner.config import load_config
    from metatuner.evaluation.generation import generate
    from metatuner.models.loading import load_model
    from metatuner.training.build import build_metatuner
    from metatuner.tasks import get_task

    cfg = load_config(None, [f"generator.max_prompt_tokens={args.prompt_tokens}"])
    model, tok = load_model(args.model, device="cpu")
    mt = build_metatuner(cfg, model, tok)
    task = get_task(args.task, args.data_dir)
    batch = task.load("train")[: args.batch_size]
    n = args.rollouts
    texts = mt.rewrite_texts(task, batch)
    prompt_len = statistics.mean(len(mt.gen_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    def shared():
        mt.generate_prompts(task, batch, sample=True, n=n)

    def copies():
        with mt.g_lora.use(("enc", "dec")):
            generate(mt.generator, mt.gen_tokenizer, [t for t in texts for _ in range(n)], args.prompt_tokens,
                     do_sample=True)

    variants = {"copies": copies, "shared": shared}
    for fn in variants.values():  # warm-up
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = med["shared"] / med["copies"]
    print(f"{args.batch_size} queries x {n} samples, rewrite text ~{prompt_len:.0f} tokens, {args.prompt_tokens} new tokens")
    for k, v in med.items():
        print(f"{k:7s} median {v:.2f}s")
    print(f"time ratio shared/copies {ratio:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "model": args.model, "task": args.task, "batch_size": args.batch_size, "rollouts": n,
            "prompt_tokens": args.prompt_tokens, "rewrite_text_tokens": prompt_len, "seconds": seconds,
            "median_seconds": med, "time_ratio": ratio,
        }, indent=2))


if __name__ == "__main__":
    main()
