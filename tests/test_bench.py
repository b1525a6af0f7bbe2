"""The benchmark grid on a tiny model: cells run once, reruns skip them, the report rebuilds from JSON."""

import json
import os
from pathlib import Path

import pytest
import yaml

from metatuner.bench import tuning
from metatuner.bench.cells import cell_dir
from metatuner.bench.collect import collect
from metatuner.bench.grid import run_grid
from metatuner.bench.protocol import Protocol
from metatuner.bench.report import aggregate, cost_table, report, table
from metatuner.errors import MetatunerError


@pytest.fixture()
def protocol_file(tmp_path, tiny_model_dir):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy",
        "tasks": ["arithmetic"],
        "seeds": [0, 1],
        "methods": {"zero-shot": {}, "cot": {"eval.max_new_tokens": 3}, "sft": {"train.steps": 1}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 3, "max_new_tokens": 4},
                   "data": {"train_limit": 4}, "train": {"batch_size": 2}},
    }, sort_keys=False))
    return path


def test_grid_runs_every_cell_once_and_rerun_skips(protocol_file, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(protocol_file), out)
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        (m, s) for m in ("zero-shot", "cot", "sft") for s in (0, 1))
    assert all(r["n"] == 3 and len(r["item_scores"]) == 3 for r in rows)
    assert next(r for r in rows if r["method"] == "sft")["train_log"]
    assert [r["method"] for r in rows][::2] == ["zero-shot", "cot", "sft"]  # the protocol's order

    import metatuner.recipes as recipes

    calls = []
    monkeypatch.setattr(recipes, "eval_method", lambda cfg, out_dir, **k: calls.append(cfg) or pytest.fail("re-ran"))
    assert len(run_grid(Protocol.load(protocol_file), out)) == 6 and calls == []


def test_results_ignore_a_cell_folder_another_worker_is_still_writing(protocol_file, tmp_path):
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(protocol_file), out, only=["zero-shot"])
    import shutil

    done = cell_dir(out, "arithmetic", "zero-shot", 0)
    shutil.copytree(done, done.with_name(f".{done.name}.tmp-{os.getpid()}"))  # complete files, not yet renamed
    assert collect(out) == rows


def test_an_unfinished_cell_is_the_only_one_rerun(protocol_file, tmp_path):
    import shutil

    out = tmp_path / "grid"
    run_grid(Protocol.load(protocol_file), out)
    shutil.rmtree(cell_dir(out, "arithmetic", "cot", 1))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    run_grid(Protocol.load(protocol_file), out)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    assert before == {k: v for k, v in after.items() if k in before}
    assert (cell_dir(out, "arithmetic", "cot", 1) / "summary.json").is_file()


def test_report_rebuilds_the_same_table_from_results_json(protocol_file, tmp_path):
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(protocol_file), out)
    md, plots = report(out)
    expected = table(json.loads((out / "results.json").read_text())) + "\n\n" + cost_table(rows)
    assert md.read_text().strip() == expected.strip()
    assert table(rows) == table(json.loads((out / "results.json").read_text()))
    assert {p.name for p in plots} >= {"bar-arithmetic.png", "curves-arithmetic.png"}
    assert all(p.stat().st_size > 1000 for p in plots)


def row(method, seed, scores, ids=None, task="t", families=None):
    """A results.json row of one cell with the given per-item scores."""
    out = {"task": task, "method": method, "seed": seed, "primary_metric": "acc", "score": sum(scores) / len(scores),
           "item_ids": ids or [f"i{k}" for k in range(len(scores))], "item_scores": scores}
    return out | ({"item_families": families} if families else {})


def test_table_averages_seeds_and_shows_interval_and_seed_spread():
    rows = [row("bettertogether", 0, [1, 0, 0, 0]), row("bettertogether", 1, [1, 1, 0, 0]),
            row("metatuner", 0, [1, 1, 1, 0]), row("metatuner", 1, [1, 1, 0, 0])]
    agg = aggregate(rows)
    assert agg[("bettertogether", "t")]["mean"] == pytest.approx(0.375)
    assert agg[("metatuner", "t")]["mean"] == pytest.approx(0.625)
    assert agg[("metatuner", "t")]["per_seed"] == {0: 0.75, 1: 0.5}
    lo, hi = agg[("metatuner", "t")]["ci_low"], agg[("metatuner", "t")]["ci_high"]
    text = table(rows)
    assert f"| metatuner | 62.5 [{100 * lo:.1f}, {100 * hi:.1f}] (50.0-75.0) | 62.5 |" in text
    assert "95% bootstrap interval over training seeds and test items, 2000 resamples" in text


def test_gain_over_bettertogether_appears_only_where_it_beats_zero_shot_with_an_interval_excluding_zero():
    ids = [f"i{k}" for k in range(40)]
    zero = [0.0] * 40
    strong = [1.0] * 20 + [0.0] * 20  # 50%, far above zero-shot's 0%
    weak = [1.0] + [0.0] * 39  # 2.5%: one item, an interval that includes zero
    best = [1.0] * 30 + [0.0] * 10
    rows = []
    for seed in (0, 1):
        rows += [row("zero-shot", seed, zero, ids, "a"), row("bettertogether", seed, strong, ids, "a"),
                 row("metatuner-j", seed, best, ids, "a"),
                 row("zero-shot", seed, zero, ids, "b"), row("bettertogether", seed, weak, ids, "b"),
                 row("metatuner-j", seed, best, ids, "b")]
    text = table(rows)
    header = text.splitlines()[0]
    assert "gain vs bettertogether (a)" in header and "gain vs bettertogether (b)" not in header
    assert "gain vs bettertogether (average)" not in header  # not every task qualifies
    assert "| metatuner-j |" in text and text.split("| metatuner-j |")[1].splitlines()[0].endswith("| +50.0% |")
    assert "Relative gain over bettertogether not shown for:" in text
    assert "- b: bettertogether is not above zero-shot with an interval that excludes zero (paired difference +2.5 [" in text
    both = [r for r in rows if r["task"] == "a"] + [r | {"task": "c"} for r in rows if r["task"] == "a"]
    assert "gain vs bettertogether (average)" in table(both).splitlines()[0] and "not shown" not in table(both)
    without = [r for r in rows if r["method"] != "bettertogether"]
    assert "gain vs" not in table(without) and "bettertogether is not in this grid" in table(without)
    no_baseline = [r for r in rows if r["method"] != "zero-shot" and r["task"] == "a"]
    assert "- a: no zero-shot cells on the same items" in table(no_baseline)


def test_the_bootstrap_interval_covers_training_seeds():
    """Two seeds with very different scores: the interval of both is wider than either's alone."""
    from metatuner.bench.stats import bootstrap_mean

    high = {(0, f"i{k}"): float(k % 10 != 0) for k in range(100)}  # 90%
    low = {(1, f"i{k}"): float(k % 10 == 0) for k in range(100)}  # 10%
    width = lambda est: est["ci_high"] - est["ci_low"]  # noqa: E731
    alone = max(width(bootstrap_mean(high)), width(bootstrap_mean(low)))
    both = bootstrap_mean(high | low)
    assert both["mean"] == pytest.approx(0.5) and both["per_seed"] == {0: 0.9, 1: 0.1}
    assert width(both) > 3 * alone and both["ci_low"] < 0.2 and both["ci_high"] > 0.8
    same = bootstrap_mean(high | {(1, i): v for (_, i), v in high.items()})  # two seeds that agree: no wider
    assert width(same) <= width(bootstrap_mean(high)) + 0.02
    assert bootstrap_mean(high) == bootstrap_mean(high)  # a fixed RNG seed: reproducible


def test_paired_differences_pair_by_item_and_seed():
    from metatuner.bench.stats import bootstrap_mean, paired_difference

    items = [f"i{k}" for k in range(50)]
    x = [float(k % 2) for k in range(50)]
    y = [float(k % 3 == 0) for k in range(50)]
    a = {(0, i): v for i, v in zip(items, x)} | {(1, i): v for i, v in zip(items, y)}
    # b: the same scores as a, listed in another item order: every (seed, item) difference is 0
    b = {(s, i): a[(s, i)] for s, i in sorted(a, key=lambda key: key[1][::-1])}
    d = paired_difference(a, b)
    assert (d["mean"], d["ci_low"], d["ci_high"], d["better"], d["worse"]) == (0.0, 0.0, 0.0, 0, 0)
    # c: a's scores with the seeds swapped. Paired by item only (averaged over seeds) the two would be
    # identical; paired by item and seed they differ, though not on average
    c = {(1 - s, i): v for (s, i), v in a.items()}
    d = paired_difference(a, c)
    assert d["mean"] == pytest.approx(0.0) and d["ci_high"] - d["ci_low"] > 0.05 and d["better"] == d["worse"] > 0
    # one item better by a point on every seed: the paired interval is far narrower than either method's
    better = dict(a) | {(s, "i2"): 1.0 for s in (0, 1)}  # i2 scored 0 on both seeds
    d = paired_difference(better, a)
    assert d["mean"] == pytest.approx(1 / 50) and d["ci_high"] - d["ci_low"] < 0.08
    assert bootstrap_mean(a)["ci_high"] - bootstrap_mean(a)["ci_low"] > 0.15
    assert paired_difference(a, {(2, "i0"): 1.0}) is None  # nothing shared


def test_bad_protocols_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": ["arithmetic"], "seeds": [0], "methods": {"zero-shot": {}}, "extra": 1}))
    with pytest.raises(MetatunerError, match="unknown protocol key 'extra'"):
        Protocol.load(bad)
    bad.write_text(yaml.safe_dump({"tasks": ["arithmetic"], "seeds": [0], "methods": {"zero-shot": {"eval.limit": 0}}}))
    with pytest.raises(MetatunerError, match="eval.limit must be >= 1"):
        Protocol.load(bad)
    with pytest.raises(MetatunerError, match="protocol file not found"):
        Protocol.load(tmp_path / "nope.yaml")
    bad.write_text(yaml.safe_dump({"tasks": ["arithmetic", "gsm8k"], "seeds": [0], "methods": {"zero-shot": {}},
                                   "common": {"eval.splits": ["test", "test_shift"]}}))
    with pytest.raises(MetatunerError, match="unknown split 'test_shift' of task 'gsm8k'; available: train, test$"):
        Protocol.load(bad)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_shipped_protocols_load_and_resolve_every_cell(name):
    protocol = Protocol.load(name)
    cells = protocol.cells()
    assert len(cells) == 4 * 15 * 2
    cfg = protocol.config("gsm8k", "wo-s", 1)
    assert (cfg.method, cfg.train.ablation, cfg.data.task, cfg.seed) == ("metatuner", "no_share", "gsm8k", 1)


def test_curves_cpu_protocol_runs_the_learning_curve_methods_at_one_budget():
    """The CPU cut of the learning curves keeps every method the curves compare, each trained 80 steps."""
    protocol = Protocol.load("curves-cpu")
    assert set(protocol.methods) == {"zero-shot", "sft", "dpo", "bettertogether", "metatuner-j", "metatuner-i",
                                     "wo-p", "wo-f"}
    assert len(protocol.cells()) == 8 * 2
    configs = {m: protocol.config("mixture", m, 0) for m in protocol.methods}
    assert {c.eval.budgets[-1] for c in configs.values()} == {40} and configs["sft"].train.steps == 80
    assert configs["dpo"].dpo.steps == 80
    assert (configs["wo-f"].train.ablation, configs["metatuner-i"].train.schedule) == ("no_hypernet", "alternate")


def test_protocol_overrides(tmp_path, protocol_file):
    protocol = Protocol.load(protocol_file, ["seeds=[3]", "common.eval.limit=1"])
    assert protocol.seeds == [3] and protocol.config("arithmetic", "cot", 3).eval.limit == 1


def test_cross_task_protocol_resolves():
    protocol = Protocol.load("cross")
    cfg = protocol.config("math+hotpotqa+cosmosqa>gsm8k", "metatuner-j", 0)
    assert cfg.method == "metatuner" and cfg.data.task == "math+hotpotqa+cosmosqa>gsm8k"


def test_arithmetic_protocol_has_every_method_on_the_builtin_task():
    from metatuner.methods import METHODS

    protocol = Protocol.load("arithmetic")
    assert protocol.tasks == ["arithmetic"] and protocol.seeds == [0, 1]
    assert {protocol.config("arithmetic", m, 0).method for m in protocol.methods} == set(METHODS.names())
    cfg = protocol.config("arithmetic", "wo-p", 0)
    assert (cfg.method, cfg.train.ablation, cfg.train.steps, cfg.data.train_limit) == ("metatuner", "no_prompt", 16, 400)
    assert cfg.eval.splits == ["test", "test_shift"]


def test_the_mixture_curves_run_every_method_and_tune_every_trained_one():
    from metatuner.methods import METHODS

    protocol = Protocol.load("curves")
    assert "mixture" in protocol.tasks
    assert {protocol.config("mixture", m, 0).method for m in protocol.methods} == set(METHODS.names())
    untrained = {"zero-shot", "cot", "opro"}
    assert set(protocol.tune.methods) == set(protocol.methods) - untrained
    cfg = protocol.tuning_config("mixture", "ppo", 3.0e-3)
    assert (cfg.ppo.lr, cfg.ppo.steps, cfg.seed) == (3.0e-3, 50, protocol.tune.seed)


def test_a_tuned_key_that_is_not_a_config_key_is_rejected_at_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": ["arithmetic"], "seeds": [0], "methods": {"sft": {}},
                                   "tune": {"methods": {"sft": {"train.learning_rate_scale": [1.0, 2.0]}}}}))
    with pytest.raises(MetatunerError, match="learning_rate_scale"):
        Protocol.load(bad)


@pytest.mark.parametrize("name", ["cpu", "cross"])
def test_the_paper_protocols_run_the_papers_baselines(name):
    protocol = Protocol.load(name)
    methods = {protocol.config(protocol.tasks[0], m, 0).method for m in protocol.methods}
    assert methods >= {"sft", "dpo", "bettertogether", "rlprompt", "bpo-selfpairs", "ppo", "grpo", "metatuner"}


def test_bench_help_lists_every_shipped_protocol(capsys):
    from metatuner.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("arithmetic", "cpu", "cross", "gpu"):
        assert name in out


CLAIMER = """
import sys, time
from pathlib import Path
from metatuner.bench.cells import claim
out, start_at, hold_until, folders = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
held = []  # kept until exit
for k, f in enumerate(folders):  # one race per folder, 0.1 s apart, all processes in step
    time.sleep(max(0.0, start_at + 0.1 * k - time.time()))
    held.append(claim(out, Path(f)))
print(" ".join("won" if h else "lost" for h in held), flush=True)
time.sleep(max(0.0, hold_until - time.time()))
"""


def claimer(out, folders, start_at, hold_until):
    """A process that claims ``folders``' cells one by one from ``start_at`` (0.1 s apart), prints won/lost
    for each, and holds them until ``hold_until``."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(out), str(start_at), str(hold_until), *map(str, folders)],
                            stdout=subprocess.PIPE, text=True)


def dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_cell_held_by_a_live_process_is_skipped_and_a_dead_ones_claim_is_taken_over(protocol_file, tmp_path):
    import time

    out = tmp_path / "grid"
    held, stale = cell_dir(out, "arithmetic", "cot", 0), cell_dir(out, "arithmetic", "sft", 1)
    (out / "claims").mkdir(parents=True)
    holder = claimer(out, [held], 0, time.time() + 600)
    assert holder.stdout.readline().strip() == "won"
    (out / "claims" / f"{stale.name}.claim").write_text(f"pid {dead_pid()} on this host (killed)\n")
    try:
        rows = run_grid(Protocol.load(protocol_file), out)
    finally:
        holder.kill()
        holder.wait()
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        [(m, s) for m in ("zero-shot", "cot", "sft") for s in (0, 1) if (m, s) != ("cot", 0)])
    assert (stale / "summary.json").is_file() and not (held / "summary.json").exists()
    assert sorted(p.name for p in (out / "claims").iterdir()) == [f"{held.name}.claim"]  # ours were released


def test_processes_racing_for_a_dead_workers_claim_exactly_one_wins(tmp_path):
    import time

    out = tmp_path / "grid"
    folders = [out / "cells" / f"arithmetic--sft--seed{i}" for i in range(20)]  # 20 races
    (out / "claims").mkdir(parents=True)
    dead = dead_pid()
    for folder in folders:
        (out / "claims" / f"{folder.name}.claim").write_text(f"pid {dead} on this host (killed)\n")
    start_at = time.time() + 2.0
    # each holds what it won until every one has raced for every folder (however late a process on a loaded
    # machine starts), so no claim is released while another process still races for it
    procs = [claimer(out, folders, start_at, start_at + 600) for _ in range(4)]
    try:
        results = [p.stdout.readline().split() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    winners = [sum(r[i] == "won" for r in results) for i in range(len(folders))]
    assert winners == [1] * len(folders)


def test_workers_run_every_cell_exactly_once(protocol_file, tmp_path, capsys):
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(protocol_file), out, workers=2)
    # stderr is not a terminal here: the parent's bar writes once per finished cell, not once a second
    assert capsys.readouterr().err.count("cells (2 workers") <= 6 + 2
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        (m, s) for m in ("zero-shot", "cot", "sft") for s in (0, 1))
    logs = [(out / "logs" / f"worker-{k}.log").read_text() for k in range(2)]
    started = [line for log in logs for line in log.splitlines() if line.endswith(" ...")]
    assert len(started) == 6 and len(set(started)) == 6  # each cell started by one worker only
    assert not list((out / "claims").iterdir())
    # the workers read the parent's protocol from its own file, not protocol.yaml, which another bench
    # command on this folder may rewrite while they run
    own, = (out / "logs").glob("protocol-*.yaml")
    assert own.read_text() == (out / "protocol.yaml").read_text()


def test_paired_difference_is_over_shared_items_and_seeds():
    from metatuner.bench.report import paired_difference

    rows = [row("metatuner-j", 0, [1, 1, 1, 0]), row("metatuner-j", 1, [1, 1, 0, 0]),
            row("sft", 0, [1, 0, 0, 0]), row("sft", 1, [1, 0, 0, 0], ["i0", "i1", "i2", "other"])]
    d = paired_difference(rows, "metatuner-j", "sft", "t")
    # the (seed, item) cells both scored: seed 0 i0-i3 (0, 1, 1, 0), seed 1 i0-i2 (0, 1, 0)
    assert d["n"] == 4 and d["mean"] == pytest.approx(3 / 7)
    assert (d["better"], d["worse"]) == (3, 0) and d["ci_low"] < d["mean"] < d["ci_high"]
    text = table(rows)
    assert "Paired difference, metatuner-j minus each method" in text and "| sft | +42.9 [" in text
    assert paired_difference(rows, "metatuner-j", "nobody", "t") is None


def test_per_family_table_for_tasks_whose_items_have_families():
    fam = ["x", "y", "x", "y"]
    rows = [row("sft", 0, [1, 0, 1, 0], families=fam), row("sft", 1, [1, 1, 1, 0], families=fam)]
    text = table(rows)
    assert "Per family on t (%, mean over seeds [95% bootstrap interval]):" in text
    assert "| sft | 100.0 [100.0, 100.0] | 25.0 [" in text
    assert "Per family" not in table([row("sft", 0, [1, 0])])


def fake_grid(tmp_path, logs):
    """A grid folder with results.json and, per (method, seed), a train log of the given records (a str
    is written as a raw line); None: a cell without a train log; "missing": a log path with no file."""
    out = tmp_path / "grid"
    rows = []
    for (method, seed), records in logs.items():
        rel = None
        if records is not None:
            rel = f"cells/t--{method}--seed{seed}-train/log.jsonl"
            if records != "missing":
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_text("".join((x if isinstance(x, str) else json.dumps(x) + "\n") for x in records))
        rows.append({"task": "t", "method": method, "seed": seed, "primary_metric": "acc", "score": 0.5,
                     "item_ids": ["i0", "i1"], "item_scores": [1, 0], "train_log": rel})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows))
    return out


def eval_record(step, **kw):
    return {"phase": "eval", "step": step, "sample_prompts": [{"id": "a", "prompt": "p", "output": "o"}], **kw}


def test_report_shows_the_last_validations_diagnostics_mean_over_seeds(tmp_path):
    from metatuner.bench.logs import diagnostics

    loss = {"phase": "joint", "step": 1, "task_loss": 1.0}
    out = fake_grid(tmp_path, {
        ("zero-shot", 0): None,
        ("metatuner-j", 0): [loss, eval_record(2, delta_norm=9.0, gate="generated", val_acc=0.25),
                             eval_record(4, delta_norm=2.0, delta_spread=0.5, prompt_equal_initial=0.25,
                                         prompt_words=10, prompt_cut=0.0, gate="initial", val_acc=0.5),
                             '{"phase": "eval", "step": 6, "delta_norm": 99'],  # torn last line
        ("metatuner-j", 1): [eval_record(2, delta_norm=1.0, val_acc=0.5),
                             eval_record(4, delta_norm=4.0, delta_spread=0.1, prompt_equal_initial=0.75,
                                         prompt_words=20, prompt_cut=0.5, gate="initial", val_acc=0.75),
                             eval_record(4, val_acc=0.75)],  # an eval record without diagnostics
        ("metatuner", 0): [eval_record(3, delta_norm=1.0, gate="generated", val_acc=0.5)],
        ("metatuner", 1): [eval_record(3, delta_norm=3.0, delta_spread=float("nan"), gate="initial")],
        ("metatuner", 2): "missing",
        ("sft", 0): [loss, eval_record(5, val_acc=0.5)],  # validated, but no diagnostics
    })
    md, plots = report(out)
    text = md.read_text()
    assert "MetaTuner diagnostics (last validation of each run, mean over seeds" in text
    assert ("| method | task | ΔW norm | ΔW spread | prompts = p~ (%) | prompt words | cut at cap (%) | gate |"
            in text)
    assert "| metatuner-j | t | 3 | 0.3 | 50.0 | 15.0 | 25.0 | initial x2 |" in text
    assert "| metatuner | t | 2 | - | - | - | - | generated x1, initial x1 |" in text
    assert "| sft | t |" not in text and "| zero-shot | t |" not in text
    assert "- metatuner-j: prompts = p~ 50.0%, ΔW spread 0.3 on t (2 runs)" in text
    diag = diagnostics(json.loads((out / "results.json").read_text()), out)
    assert set(diag) == {("metatuner-j", "t"), ("metatuner", "t")} and diag[("metatuner-j", "t")]["runs"] == 2
    assert {p.name for p in plots} >= {"bar-t.png", "curves-t.png", "curves-val-t.png"}


def test_read_log_skips_torn_and_non_json_lines(tmp_path):
    from metatuner.bench.logs import read_log

    path = tmp_path / "log.jsonl"
    path.write_text('{"phase": "eval", "step": 1}\nnot json\n[1, 2]\n\n{"phase": "joint", "step": 2}\n{"phase": "ev')
    assert read_log(path) == [{"phase": "eval", "step": 1}, {"phase": "joint", "step": 2}]
    assert read_log(tmp_path / "absent.jsonl") == []


def test_report_without_diagnostics_has_no_section_and_no_validation_curves(tmp_path):
    out = fake_grid(tmp_path, {("zero-shot", 0): None,
                               ("sft", 0): [{"phase": "sft", "step": 0, "sft_loss": 2.0}, '{"phase": "sf'],
                               ("metatuner", 0): [eval_record(4, val_acc=0.5)]})  # one step: no curve
    md, plots = report(out)
    assert "MetaTuner diagnostics" not in md.read_text()
    rows = json.loads((out / "results.json").read_text())
    assert md.read_text().strip() == (table(rows) + "\n\n" + cost_table(rows)).strip()
    assert "curves-val-t.png" not in {p.name for p in plots}


def test_one_diagnostic_line_per_method_that_has_one(tmp_path):
    from metatuner.bench.report import method_lines

    def fitted(method, seed, predictor, task="t"):
        return row(method, seed, [1, 0]) | {"task": task, "predictor": predictor}

    dpo = lambda gold, pairs: {"predictor": "DPOPredictor", "training": {"gold_fallback": gold, "pairs": pairs}}  # noqa: E731
    steps = [{"step": 0, "kind": "initial"}, {"step": 1, "kind": "p"}, {"step": 2, "kind": "w"}]
    rows = [fitted("zero-shot", 0, {"predictor": "LMPredictor"}),
            fitted("dpo", 0, dpo(30, 40)), fitted("dpo", 1, dpo(10, 40)),
            fitted("dpo", 0, dpo(30, 40), "t@test_shift"),  # the same fit scored on another split: counted once
            fitted("bettertogether", 0, {"chosen_step": 0, "chosen_kind": "initial", "steps": steps}),
            fitted("bettertogether", 1, {"chosen_step": 2, "steps": steps}),  # older rows: kind from the steps
            fitted("bettertogether", 0, {"chosen_step": 2, "chosen_kind": "w", "best_step": 1, "best_kind": "p",
                                         "steps": steps}, "u")]
    lines = method_lines(rows, tmp_path)
    assert lines[0].startswith("Method diagnostics")
    assert "- dpo: gold-answer fallback in 40/80 pairs (50.0%) on t" in lines
    assert ("- bettertogether: returned step 0 (initial) x1, step 2 (w) x1 on t; returned step 2 (w) x1 on u; "
            "best on validation step 1 (p) x1 on u") in lines
    assert not any("zero-shot" in line for line in lines)
    assert method_lines([fitted("zero-shot", 0, {})], tmp_path) == []


def test_a_cell_is_fitted_once_and_scored_on_every_test_split(tmp_path, tiny_model_dir, monkeypatch):
    import metatuner.recipes as recipes
    from metatuner.methods.trained import SFT

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "tasks": ["arithmetic"], "seeds": [0], "methods": {"zero-shot": {}, "sft": {"train.steps": 1}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 3, "max_new_tokens": 4,
                   "splits": ["test", "test_shift"]}, "data": {"train_limit": 4}, "train": {"batch_size": 2}},
    }, sort_keys=False))
    fits = []
    fit = SFT.fit
    monkeypatch.setattr(SFT, "fit", lambda self, *a: fits.append(1) or fit(self, *a))
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(path), out)
    assert fits == [1]  # sft trained once for both splits
    assert [(r["method"], r["task"], r["split"]) for r in rows] == [
        ("zero-shot", "arithmetic", "test"), ("zero-shot", "arithmetic@test_shift", "test_shift"),
        ("sft", "arithmetic", "test"), ("sft", "arithmetic@test_shift", "test_shift")]
    shifted = next(r for r in rows if r["method"] == "sft" and r["split"] == "test_shift")
    assert shifted["item_ids"] == [f"arithmetic-test_shift-{k}" for k in range(3)]
    assert shifted["train_log"] == "cells/arithmetic--sft--seed0-train/log.jsonl" and shifted["fit_seconds"] > 0
    assert (out / "cells" / "arithmetic--sft--seed0@test_shift" / "summary.json").is_file()
    md, _ = report(out)
    assert "| method | arithmetic (exact_match_flexible) | arithmetic@test_shift (exact_match_flexible) |" in md.read_text()

    # a cell that stopped after writing its other split but before its own folder runs again in full
    import shutil

    shutil.rmtree(cell_dir(out, "arithmetic", "sft", 0))
    run_grid(Protocol.load(path), out)
    assert fits == [1, 1] and len(json.loads((out / "results.json").read_text())) == 4
    monkeypatch.setattr(recipes, "eval_method", lambda cfg, out_dir, **k: pytest.fail("re-ran"))
    assert len(run_grid(Protocol.load(path), out)) == 4


def test_eval_splits_are_checked():
    from metatuner.config import load_config

    assert load_config(None, []).eval.splits == ["test"]
    for bad, message in (("[]", "at least one split"), ("[test, test]", "each once"), ("[train]", "may not hold")):
        with pytest.raises(MetatunerError, match=message):
            load_config(None, [f"eval.splits={bad}"])


def test_learning_curves_train_each_cell_once_and_score_every_budget(tmp_path, tiny_model_dir):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "tasks": ["arithmetic"], "seeds": [0], "methods": {
            "zero-shot": {}, "sft": {"train.steps": 4},
            "metatuner-j": {"method": "metatuner", "train.steps": 4, "train.actor_warmup_steps": 2,
                            "train.generator_warmup_steps": 1, "train.generator_warmup_queries": 2},
            "dpo": {"method": "dpo", "dpo.steps": 4, "dpo.queries": 4, "dpo.samples_per_query": 2}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 3, "max_new_tokens": 4,
                   "budgets": [0, 2, 9]}, "data": {"train_limit": 6, "val_size": 2},
                   "train": {"batch_size": 2, "rollouts": 2}, "generator": {"max_prompt_tokens": 4}},
    }, sort_keys=False))
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(path), out)
    assert [(r["method"], r["budget"]) for r in rows] == [("zero-shot", 0), ("sft", 4), ("metatuner-j", 4), ("dpo", 4)]
    curves = json.loads((out / "curves.json").read_text())
    # budget 9 is beyond every run's 4 steps: its end is scored once, as the final point
    assert sorted((r["method"], r["budget"]) for r in curves) == sorted(
        [("zero-shot", 0)] + [(m, b) for m in ("sft", "metatuner-j", "dpo") for b in (0, 2, 4)])
    for method in ("sft", "metatuner-j", "dpo"):
        seconds = [r["fit_seconds"] for r in sorted(curves, key=lambda r: r["budget"]) if r["method"] == method]
        assert seconds == sorted(seconds) and seconds[0] < seconds[-1]  # fit time accumulates along the curve
        tokens = [r["train_tokens"] for r in sorted(curves, key=lambda r: r["budget"]) if r["method"] == method]
        assert tokens == sorted(tokens)  # so do the tokens decoded while fitting, scoring excluded
    cost = {r["method"]: r for r in rows}
    assert cost["zero-shot"]["trainable_params"] == 0 and cost["zero-shot"]["train_tokens"] == 0
    assert cost["sft"]["train_tokens"] == 0  # SFT decodes nothing; DPO samples answers, MetaTuner rolls out
    assert cost["dpo"]["train_tokens"] > 0 and cost["metatuner-j"]["train_tokens"] > 0
    assert 0 < cost["sft"]["trainable_params"] < cost["metatuner-j"]["trainable_params"]
    assert cost["dpo"]["trainable_params"] > 0
    assert (out / "cells" / "arithmetic--sft--seed0.b2" / "summary.json").is_file()
    log = [json.loads(line) for line in (out / "cells" / "arithmetic--metatuner-j--seed0-train" / "log.jsonl")
           .read_text().splitlines()]
    assert sorted({r["step"] for r in log if r.get("gate")}) == [0, 2, 4]  # each scored point had its own gate
    md, plots = report(out)
    text = md.read_text()
    assert "Learning curve, arithmetic" in text and "| method | 0 | 2 | 4 |" in text
    assert "| method | optimizer steps | trainable parameters | training seconds | tokens generated |" in text
    assert f"| sft | 4 | {cost['sft']['trainable_params']:,} |" in text
    assert {p.name for p in plots} >= {"learning-budget-arithmetic.png", "learning-seconds-arithmetic.png"}


def test_tuning_chooses_each_methods_learning_rate_on_validation_and_the_cells_use_it(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    import metatuner.evaluation.harness as harness
    import metatuner.recipes as recipes
    from metatuner.bench.tuning import pick

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "tasks": ["arithmetic"], "seeds": [0], "methods": {"zero-shot": {}, "sft": {"train.steps": 2}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 2, "max_new_tokens": 4},
                   "data": {"train_limit": 6, "val_size": 3}, "train": {"batch_size": 2}},
        "tune": {"seed": 0, "overrides": {"train.steps": 1}, "methods": {"sft": {"train.lr_scale": [0.5, 2.0, 1.0]}}},
    }, sort_keys=False))
    fitted, scored = [], []
    fit = recipes.fit_method
    monkeypatch.setattr(recipes, "fit_method", lambda cfg, *a, **k: fitted.append(
        (cfg.train.steps, cfg.train.lr_scale)) or fit(cfg, *a, **k))
    evaluate = harness.evaluate

    def scripted(predictor, task, examples, **kw):  # validation score by learning rate: 2.0 is best
        result = evaluate(predictor, task, examples, **kw)
        scored.append([ex.id for ex in examples])
        result.metrics[task.primary_metric]["mean"] = {0.5: 0.2, 2.0: 0.6, 1.0: 0.4}[fitted[-1][1]]
        return result

    monkeypatch.setattr(harness, "evaluate", scripted)
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(path), out)
    assert fitted[:3] == [(1, 0.5), (1, 2.0), (1, 1.0)]  # the tuning runs, at the tuning budget
    assert fitted[4:] == [(2, 2.0)]  # after zero-shot, the sft cell trains with the chosen value at its budget
    assert all(ids and all("-train-" in i for i in ids) for ids in scored[:3])  # validation carved from train only
    record = json.loads((out / "tuning" / "arithmetic--sft.json").read_text())
    assert record["chosen"] == 2.0 and [t["val_score"] for t in record["tried"]] == [0.2, 0.6, 0.4]
    assert {r["method"]: r["tuned"] for r in rows} == {"zero-shot": {}, "sft": {"train.lr_scale": 2.0}}
    text = report(out)[0].read_text()
    assert "| arithmetic | sft | train.lr_scale | 0.5: 20.0, 2.0: 60.0, 1.0: 40.0 (n=3) | 2.0 |" in text
    assert "tokens generated | tuning seconds (per task) |" in text and "| zero-shot | 0 | 0 |" in text
    run_grid(Protocol.load(path), out)  # a rerun reuses the choice and the cells
    assert len(fitted) == 5
    assert pick([0.5, 0.5, 0.1], [1, 2, 3], current=2) == 1 and pick([0.5, 0.5], [1, 2], current=9) == 0
    with pytest.raises(MetatunerError, match="not among the protocol's methods"):
        Protocol.load(path, ["tune.methods.dpo={dpo.lr: [1, 2]}"])


def test_a_tuning_job_held_by_another_process_is_awaited_and_taken_over_when_its_tuner_dies(tmp_path, tiny_model_dir,
                                                                                            capsys, monkeypatch):
    import time

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "tasks": ["arithmetic"], "seeds": [0], "methods": {"sft": {"train.steps": 1}, "zero-shot": {}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 2, "max_new_tokens": 4},
                   "data": {"train_limit": 6, "val_size": 2}, "train": {"batch_size": 2}},
        "tune": {"overrides": {"train.steps": 1}, "methods": {"sft": {"train.lr_scale": [1.0, 2.0]}}},
    }, sort_keys=False))
    out = tmp_path / "grid"
    # another worker holds sft's tuning job, then dies without a choice (its lock file stays behind): it dies
    # once the sft cell has found the job held while waiting for its choice, not at a time a loaded machine
    # may reach before or after that
    holder = claimer(out, [Path("tuning--arithmetic--sft")], 0, time.time() + 600)
    assert holder.stdout.readline().strip() == "won"
    real_tune, awaited = tuning.tune, []

    def tune(*args, quiet=False, **kwargs):
        records = real_tune(*args, quiet=quiet, **kwargs)
        if quiet and not awaited:  # the first look of the waiting cell: still held, so nothing was tuned
            awaited.append(records)
            holder.kill()
            holder.wait()
        return records

    monkeypatch.setattr(tuning, "tune", tune)
    try:
        rows = run_grid(Protocol.load(path), out)
    finally:
        holder.kill()
        holder.wait()
    assert awaited == [[]]
    assert "tuning sft on arithmetic: running in another process, skipped" in capsys.readouterr().out
    record = out / "tuning" / "arithmetic--sft.json"
    choice = json.loads(record.read_text())
    assert len(choice["tried"]) == 2  # tuned here, once its tuner was gone
    # the cell that needs no choice ran first instead of waiting; the sft cell ran with the choice
    assert (cell_dir(out, "arithmetic", "zero-shot", 0) / "summary.json").stat().st_mtime < record.stat().st_mtime
    assert {r["method"]: r["tuned"] for r in rows} == {"zero-shot": {}, "sft": {"train.lr_scale": choice["chosen"]}}
    assert not list((out / "claims").iterdir())


def test_workers_share_the_tuning_jobs_out_and_each_runs_once(tmp_path, tiny_model_dir):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "tasks": ["arithmetic", "mixture"], "seeds": [0], "methods": {"sft": {"train.steps": 1}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 2, "max_new_tokens": 4},
                   "data": {"train_limit": 6, "val_size": 2}, "train": {"batch_size": 2}},
        "tune": {"overrides": {"train.steps": 1}, "methods": {"sft": {"train.lr_scale": [1.0, 2.0]}}},
    }, sort_keys=False))
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(path), out, workers=2)
    logs = "".join((out / "logs" / f"worker-{k}.log").read_text() for k in range(2))
    for task in ("arithmetic", "mixture"):  # each job's two fits ran in one worker, once
        assert logs.count(f"tuning sft on {task}: train.lr_scale=") == 2
        choice = json.loads((out / "tuning" / f"{task}--sft.json").read_text())
        assert {r["tuned"]["train.lr_scale"] for r in rows if r["task"] == task} == {choice["chosen"]}
    assert len(rows) == 2 and not list((out / "claims").iterdir())


def test_bench_backend_flags_are_checked_before_any_work(protocol_file, tmp_path, capsys, monkeypatch):
    import sys

    from metatuner.cli import main

    out = tmp_path / "grid"
    base = ["bench", "--config", str(protocol_file), "--out", str(out), "--no-report"]
    for extra, message in ((["--address", "auto"], "--address is for --backend ray"),
                           (["--gpus-per-cell", "1"], "--gpus-per-cell is for --backend ray"),
                           (["--backend", "ray", "--workers", "2"], "--workers is for --backend local"),
                           (["--backend", "ray", "--cpus-per-cell", "0"], "more than 0 CPUs")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main(base + ["--backend", "ray"]) == 2
    assert "needs Ray: pip install 'metatuner[ray]'" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_eval_budget_splits_are_checked():
    from metatuner.config import load_config

    assert load_config(None, ["eval.splits=[test, test_shift]", "eval.budget_splits=[test]"]).eval.budget_splits == ["test"]
    for bad in ("[]", "[test_shift]", "[test, test]"):
        with pytest.raises(MetatunerError, match="eval.budget_splits must name"):
            load_config(None, ["eval.splits=[test]", f"eval.budget_splits={bad}"])


RESUMABLE = {"wo-p": {"method": "metatuner", "train.ablation": "no_prompt"}, "sft": {}}


def _resumable_grid(path: Path, tiny_model_dir, method: str = "wo-p") -> Protocol:
    path.write_text(yaml.safe_dump({
        "tasks": ["arithmetic"], "seeds": [0],
        "methods": {method: RESUMABLE[method]},
        "common": {"model": {"name": str(tiny_model_dir)},
                   "eval": {"limit": 3, "max_new_tokens": 4, "splits": ["test", "test_shift"], "budgets": [2, 4],
                            "budget_splits": ["test"]},
                   "data": {"train_limit": 6, "val_size": 2},
                   "train": {"steps": 6, "batch_size": 2, "save_every": 2, "actor_warmup_steps": 1}},
    }, sort_keys=False))
    return Protocol.load(path)


def _answers(folder: Path) -> list:
    from metatuner.evaluation.harness import read_results_folder

    return [(r["id"], r["output"]) for r in read_results_folder(folder)[1]]


@pytest.mark.parametrize("method", ["wo-p", "sft"])
def test_a_stopped_trained_cell_resumes_from_its_checkpoint_with_the_results_of_an_unbroken_run(
        tmp_path, tiny_model_dir, monkeypatch, method):
    import signal

    from metatuner import interrupts
    from metatuner.methods.base import Method

    protocol = _resumable_grid(tmp_path / "p.yaml", tiny_model_dir, method)
    run_grid(protocol, tmp_path / "whole")
    whole = tmp_path / "whole" / "cells"
    cell = f"arithmetic--{method}--seed0"
    # learning-curve points on test only; the end on both splits
    assert sorted(p.name for p in whole.iterdir()) == [
        cell, f"{cell}-train", f"{cell}.b2", f"{cell}.b4", f"{cell}@test_shift"]

    out = tmp_path / "stopped"
    seen = []
    at_step = Method.at_step
    with monkeypatch.context() as m:  # a SIGTERM after optimizer step 5: the trainer saves there and stops
        m.setattr(Method, "at_step", lambda self, step, predictor: seen.append(step) or at_step(self, step, predictor))
        m.setattr(interrupts, "requested", lambda: signal.SIGTERM if seen and seen[-1] >= 5 else None)
        with pytest.raises(interrupts.Stopped):
            run_grid(protocol, out)
    cells = out / "cells"
    assert not (cells / cell).exists()
    kept = {b: (cells / f"{cell}.b{b}" / "summary.json").stat().st_mtime_ns for b in (2, 4)}

    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(Method, "at_step", lambda self, step, predictor: seen.append(step) or at_step(self, step, predictor))
        run_grid(protocol, out)
    assert seen == [6]  # steps 1-5 were not trained again
    for b in (2, 4):  # nor were the points they had scored
        assert (cells / f"{cell}.b{b}" / "summary.json").stat().st_mtime_ns == kept[b]
    for name in (cell, f"{cell}@test_shift", f"{cell}.b2", f"{cell}.b4"):
        assert _answers(cells / name) == _answers(whole / name)  # bit for bit the unbroken run's answers
    log = [json.loads(line) for line in (cells / f"{cell}-train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "seconds" in r] == list(range(1, 7))  # each step logged once
    fit = [json.loads((cells / name / "budget.json").read_text())["fit_seconds"]
           for name in (f"{cell}.b4", cell)]
    assert 0 < fit[0] < fit[1]  # the clock went on from the checkpoint's reading


def test_a_stopped_cell_whose_config_changed_starts_over(tmp_path, tiny_model_dir, monkeypatch):
    import signal

    from metatuner import interrupts
    from metatuner.methods.base import Method

    protocol = _resumable_grid(tmp_path / "p.yaml", tiny_model_dir)
    out, seen = tmp_path / "grid", []
    at_step = Method.at_step
    with monkeypatch.context() as m:
        m.setattr(Method, "at_step", lambda self, step, predictor: seen.append(step) or at_step(self, step, predictor))
        m.setattr(interrupts, "requested", lambda: signal.SIGTERM if seen and seen[-1] >= 3 else None)
        with pytest.raises(interrupts.Stopped):
            run_grid(protocol, out)
    assert (out / "cells" / "arithmetic--wo-p--seed0.b2" / "summary.json").is_file()
    # another config: the checkpoint and the point at step 2 are stale
    protocol = Protocol.load(tmp_path / "p.yaml", ["common.train.lr_scale=0.5"])
    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(Method, "at_step", lambda self, step, predictor: seen.append(step) or at_step(self, step, predictor))
        run_grid(protocol, out)
    assert seen == list(range(0, 7))
    assert "lr_scale: 0.5" in (out / "cells" / "arithmetic--wo-p--seed0.b2" / "config.yaml").read_text()


def test_a_cell_stopped_in_its_final_scoring_keeps_the_splits_it_scored(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    from metatuner.methods.base import Method

    protocol = _resumable_grid(tmp_path / "p.yaml", tiny_model_dir)
    out = tmp_path / "grid"
    run_grid(protocol, out)
    cells = out / "cells"
    shifted = (cells / "arithmetic--wo-p--seed0@test_shift" / "summary.json").stat().st_mtime_ns
    answers = _answers(cells / "arithmetic--wo-p--seed0")
    shutil.rmtree(cells / "arithmetic--wo-p--seed0")  # as if stopped after test_shift, before test was written
    seen, at_step = [], Method.at_step
    with monkeypatch.context() as m:
        m.setattr(Method, "at_step", lambda self, step, predictor: seen.append(step) or at_step(self, step, predictor))
        run_grid(protocol, out)
    assert seen == []  # training had ended: nothing is trained again
    assert (cells / "arithmetic--wo-p--seed0@test_shift" / "summary.json").stat().st_mtime_ns == shifted
    assert _answers(cells / "arithmetic--wo-p--seed0") == answers


def test_the_cost_table_counts_each_cell_once_also_when_it_scored_no_test_split():
    def row(method, seed, split, seconds):
        task = "t" if split == "test" else f"t@{split}"
        return {"method": method, "task": task, "seed": seed, "split": split, "budget": 10, "trainable_params": 5,
                "fit_seconds": seconds, "train_tokens": 0}

    only_extra = [row("sft", 0, "test_extra", 100.0), row("sft", 1, "test_extra", 300.0)]
    assert "| sft | 10 | 5 | 200 | 0 |" in cost_table(only_extra)
    # a cell that scored two splits is one fit, counted from its test row
    both = [row("sft", 0, "test_shift", 999.0), row("sft", 0, "test", 100.0), row("sft", 1, "test", 300.0)]
    assert "| sft | 10 | 5 | 200 | 0 |" in cost_table(both)
