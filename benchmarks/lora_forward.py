"""Forward-pass cost of per-row (generated) LoRA against the bare base model and PEFT's static LoRA.

Launch (from the repository root):

    .venv/bin/python benchmarks/lora_forward.py
    .venv/bin/python benchmarks/lora_forward.py --batch-sizes 1,8 --seq-len 128 --repeats 3 --out lora.json

Times one no-grad forward pass over a full sequence (all logits, no KV cache) of the default model
``smollm2-135m`` on random token ids ``[bs, seq_len]``, in five variants:

- ``base``                       the bare model;
- ``peft:<targets>``             PEFT's LoRA (rank 8, one static adapter) on the targets;
- ``rows:<targets>``             :class:`~metatuner.models.lora.LoRAModel` with random per-row factors
                                 ``A [bs, r, in]``, ``B [bs, out, r]`` (rank 8) on the targets;

for two target settings (``--settings``): ``qv`` (q_proj, v_proj) and ``all-linear`` (every linear
layer of the decoder: q, k, v, o, gate, up, down). Writing the factors (the hypernetwork) is not
timed; only the LoRA terms inside the forward pass are.

The variants run interleaved (base, peft, rows, peft, rows, base, ...) after one untimed warm-up
round, so machine noise hits all of them alike; the median of ``--repeats`` rounds is reported, with
the ratios per-row/base (targets: 1.05x for q,v and 1.10x for all linear layers), peft/base and
per-row/peft. PEFT wraps modules in place, so every LoRA variant gets its own copy of the model.

Defaults: batch sizes 1,8,32, sequence length 128 (not 256: a batch-32 forward pass at 256 takes
about 14 s on two idle cores and 27 s on one, which puts the default run at 10 to 20 minutes),
5 repeats; the default run takes about 5 minutes on two idle cores, about 9 on one shared core.
Thread count is the number of usable cores unless ``--threads``. When another job shares the
machine, pass ``--threads 1`` and run niced (``nice -n 10 ...``): with more threads than free cores,
OpenMP threads wait on each other at every operator (a batch-1 pass then took 8 s instead of 0.45 s)
and the medians mean nothing. Read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

SETTINGS = {
    "qv": ["q_proj", "v_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
TARGET_RATIO = {"qv": 1.05, "all-linear": 1.10}  # per-row / base


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model alias or folder")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (full sequence, no padding)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size (median reported)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"target settings: {', '.join(SETTINGS)}")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown setting {unknown[0]!r}; available: {', '.join(SETTINGS)}")
    return args


def build_variants(model, settings: list[str], rank: int, alpha: float) -> dict[str, dict]:
    """``{variant name: {"model", "lora" (per-row only), "sites"}}``, each LoRA variant on its own copy."""
    import peft

    from metatuner.models.lora import LoRAModel

    variants = {"base": {"model": model}}
    for setting in settings:
        kinds = SETTINGS[setting]
        # init_lora_weights=False gives B random too, so PEFT does the real work (it never skips B = 0 anyway)
        cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=kinds, lora_dropout=0.0,
                              init_lora_weights=False)
        variants[f"peft:{setting}"] = {"model": peft.get_peft_model(copy.deepcopy(model), cfg).eval()}
        rows_model = copy.deepcopy(model)
        lora = LoRAModel(rows_model)
        sites = lora.select(kinds, range(lora.num_layers))
        for site in sites:
            lora.module(site)  # wrap every site now: use() only reaches wrapped layers
        variants[f"rows:{setting}"] = {"model": rows_model, "lora": lora, "sites": sites}
    return variants


def random_factors(lora, sites, bs: int, rank: int, gen: torch.Generator) -> dict:
    """``{site key: (A [bs, r, in], B [bs, out, r])}``, PEFT-like magnitudes, non-zero B."""
    out = {}
    for site in sites:
        m = lora.module(site)
        a = torch.randn(bs, rank, m.in_features, generator=gen) / m.in_features**0.5  # [bs, r, in]
        b = torch.randn(bs, m.out_features, rank, generator=gen) * 0.01  # [bs, out, r]
        out[site.key] = (a, b)
    return out


def time_forward(variant: dict, ids: torch.Tensor, mask: torch.Tensor, factors: dict | None, scale: float) -> float:
    """Seconds for one forward pass of ``ids [bs, T]`` (all logits, no cache)."""
    model = variant["model"]
    lora = variant.get("lora")
    start = time.perf_counter()
    if lora is None:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    else:
        with lora.use(rows=factors, rows_scale=scale):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    elapsed = time.perf_counter() - start
    del out  # the logits of a large batch are ~1.6 GB; free them before the next variant
    return elapsed


def run(args: argparse.Namespace) -> list[dict]:
    from metatuner.models.loading import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, device="cpu")
    variants = build_variants(model, args.settings, args.rank, args.alpha)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    scale = args.alpha / args.rank
    results = []
    for bs in args.batch_sizes:
        ids = torch.randint(0, vocab, (bs, args.seq_len), generator=gen)  # [bs, T]
        mask = torch.ones_like(ids)  # [bs, T]: no padding
        factors = {
            name: random_factors(v["lora"], v["sites"], bs, args.rank, gen)
            for name, v in variants.items() if "lora" in v
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rnd in range(args.repeats + 1):  # round 0 warms up (allocator, oneDNN primitives) untimed
            for name, v in variants.items():
                t = time_forward(v, ids, mask, factors.get(name), scale)
                if rnd > 0:
                    times[name].append(t)
            print(f"  bs={bs} round {rnd}/{args.repeats}: " + "  ".join(
                f"{n}={times[n][-1]:.3f}s" for n in variants if rnd > 0) + ("warm-up" if rnd == 0 else ""),
                file=sys.stderr, flush=True)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for setting in args.settings:
            base, pf, rows = med["base"], med[f"peft:{setting}"], med[f"rows:{setting}"]
            results.append({
                "targets": setting, "batch_size": bs, "seq_len": args.seq_len,
                "median_s": {"base": base, "peft": pf, "rows": rows},
                "times_s": {"base": times["base"], "peft": times[f"peft:{setting}"], "rows": times[f"rows:{setting}"]},
                "ratios": {"rows/base": rows / base, "peft/base": pf / base, "rows/peft": rows / pf},
                "target_rows_over_base": TARGET_RATIO[setting],
                "meets_target": rows / base <= TARGET_RATIO[setting],
            })
    return results


def print_table(results: list[dict]) -> None:
    head = f"{'targets':<11} {'bs':>3} {'base s':>8} {'peft s':>8} {'rows s':>8} " \
           f"{'rows/base':>9} {'peft/base':>9} {'rows/peft':>9} {'target':>7}  ok"
    print(head)
    print("-" * len(head))
    for r in results:
        m, q = r["median_s"], r["ratios"]
        print(f"{r['targets']:<11} {r['batch_size']:>3} {m['base']:>8.3f} {m['peft']:>8.3f} {m['rows']:>8.3f} "
              f"{q['rows/base']:>8.3f}x {q['peft/base']:>8.3f}x {q['rows/peft']:>8.3f}x "
              f"{r['target_rows_over_base']:>6.2f}x  {'yes' if r['meets_target'] else 'NO'}")


def main(argv=None) -> None:
    args = parse_args(argv)
    with torch.inference_mode():
        results = run(args)
    print(f"model={args.model} seq_len={args.seq_len} repeats={args.repeats} rank={args.rank} "
          f"threads={args.threads} (median seconds per forward pass)")
    print_table(results)
    if args.out:
        config = {k: v for k, v in vars(args).items() if k != "out"}
        Path(args.out).write_text(json.dumps({"config": config, "results": results}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
