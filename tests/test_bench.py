"""The benchmark grid on a tiny model: cells run once, reruns skip them, the report rebuilds from JSON."""

import json
import os

import pytest
import yaml

from metatuner.bench import grid
from metatuner.bench.grid import Protocol, run_grid
from metatuner.bench.report import aggregate, report, table
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
    monkeypatch.setattr(recipes, "eval_method", lambda cfg, out_dir: calls.append(cfg) or pytest.fail("re-ran"))
    assert len(run_grid(Protocol.load(protocol_file), out)) == 6 and calls == []


def test_results_ignore_a_cell_folder_another_worker_is_still_writing(protocol_file, tmp_path):
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(protocol_file), out, only=["zero-shot"])
    import shutil

    done = grid.cell_dir(out, "arithmetic", "zero-shot", 0)
    shutil.copytree(done, done.with_name(f".{done.name}.tmp-{os.getpid()}"))  # complete files, not yet renamed
    assert grid.collect(out) == rows


def test_an_unfinished_cell_is_the_only_one_rerun(protocol_file, tmp_path):
    import shutil

    out = tmp_path / "grid"
    run_grid(Protocol.load(protocol_file), out)
    shutil.rmtree(grid.cell_dir(out, "arithmetic", "cot", 1))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    run_grid(Protocol.load(protocol_file), out)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    assert before == {k: v for k, v in after.items() if k in before}
    assert (grid.cell_dir(out, "arithmetic", "cot", 1) / "summary.json").is_file()


def test_report_rebuilds_the_same_table_from_results_json(protocol_file, tmp_path):
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(protocol_file), out)
    md, plots = report(out)
    assert md.read_text().strip() == table(json.loads((out / "results.json").read_text())).strip()
    assert md.read_text().strip() == table(rows).strip()
    assert {p.name for p in plots} >= {"bar-arithmetic.png", "curves-arithmetic.png"}
    assert all(p.stat().st_size > 1000 for p in plots)


def test_table_averages_seeds_and_reports_gain_over_bettertogether():
    def row(method, seed, scores):
        return {"task": "t", "method": method, "seed": seed, "primary_metric": "acc", "score": sum(scores) / len(scores),
                "item_ids": [f"i{k}" for k in range(len(scores))], "item_scores": scores}

    rows = [row("bettertogether", 0, [1, 0, 0, 0]), row("bettertogether", 1, [1, 1, 0, 0]),
            row("metatuner", 0, [1, 1, 1, 0]), row("metatuner", 1, [1, 1, 0, 0])]
    agg = aggregate(rows)
    assert agg[("bettertogether", "t")]["mean"] == pytest.approx(0.375)
    assert agg[("metatuner", "t")]["mean"] == pytest.approx(0.625)
    text = table(rows)
    assert "| metatuner | 62.5" in text and "+66.7%" in text


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


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_shipped_protocols_load_and_resolve_every_cell(name):
    protocol = Protocol.load(name)
    cells = protocol.cells()
    assert len(cells) == 4 * 11 * 2
    cfg = protocol.config("gsm8k", "wo-s", 1)
    assert (cfg.method, cfg.train.ablation, cfg.data.task, cfg.seed) == ("metatuner", "no_share", "gsm8k", 1)


def test_protocol_overrides(tmp_path, protocol_file):
    protocol = Protocol.load(protocol_file, ["seeds=[3]", "common.eval.limit=1"])
    assert protocol.seeds == [3] and protocol.config("arithmetic", "cot", 3).eval.limit == 1


def test_cross_task_protocol_resolves():
    protocol = Protocol.load("cross")
    cfg = protocol.config("math+hotpotqa+cosmosqa>gsm8k", "metatuner-j", 0)
    assert cfg.method == "metatuner" and cfg.data.task == "math+hotpotqa+cosmosqa>gsm8k"


def test_arithmetic_protocol_has_every_method_on_the_builtin_task():
    protocol = Protocol.load("arithmetic")
    assert len(protocol.cells()) == 11 * 2 and protocol.tasks == ["arithmetic"]
    cfg = protocol.config("arithmetic", "wo-p", 0)
    assert (cfg.method, cfg.train.ablation, cfg.train.steps, cfg.data.train_limit) == ("metatuner", "no_prompt", 12, 400)


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
from metatuner.bench.grid import claim
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
    held, stale = grid.cell_dir(out, "arithmetic", "cot", 0), grid.cell_dir(out, "arithmetic", "sft", 1)
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
    procs = [claimer(out, folders, start_at, start_at + 4.0) for _ in range(4)]
    results = [p.communicate(timeout=60)[0].split() for p in procs]
    winners = [sum(r[i] == "won" for r in results) for i in range(len(folders))]
    assert winners == [1] * len(folders)


def test_workers_run_every_cell_exactly_once(protocol_file, tmp_path):
    out = tmp_path / "grid"
    rows = run_grid(Protocol.load(protocol_file), out, workers=2)
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        (m, s) for m in ("zero-shot", "cot", "sft") for s in (0, 1))
    logs = [(out / "logs" / f"worker-{k}.log").read_text() for k in range(2)]
    started = [line for log in logs for line in log.splitlines() if line.endswith(" ...")]
    assert len(started) == 6 and len(set(started)) == 6  # each cell started by one worker only
    assert not list((out / "claims").iterdir())


def test_paired_difference_is_over_shared_items_and_seeds():
    from metatuner.bench.report import paired_difference

    def row(method, seed, scores, ids=None):
        return {"task": "t", "method": method, "seed": seed, "primary_metric": "acc", "score": sum(scores) / len(scores),
                "item_ids": ids or [f"i{k}" for k in range(len(scores))], "item_scores": scores}

    rows = [row("metatuner-j", 0, [1, 1, 1, 0]), row("metatuner-j", 1, [1, 1, 0, 0]),
            row("sft", 0, [1, 0, 0, 0]), row("sft", 1, [1, 0, 0, 0], ["i0", "i1", "i2", "other"])]
    d = paired_difference(rows, "metatuner-j", "sft", "t")
    # per item, averaged over the seeds both have: i0 0, i1 1, i2 (1 + 0) / 2, i3 (seed 0 only) 0
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.375)
    assert (d["better"], d["worse"]) == (2, 0) and d["ci_low"] < d["mean"] < d["ci_high"]
    text = table(rows)
    assert "Paired difference, metatuner-j minus each method" in text and "| sft | +37.5 [" in text
    assert paired_difference(rows, "metatuner-j", "nobody", "t") is None


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
    from metatuner.bench.report import diagnostics

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
    diag = diagnostics(json.loads((out / "results.json").read_text()), out)
    assert set(diag) == {("metatuner-j", "t"), ("metatuner", "t")} and diag[("metatuner-j", "t")]["runs"] == 2
    assert {p.name for p in plots} >= {"bar-t.png", "curves-t.png", "curves-val-t.png"}


def test_read_log_skips_torn_and_non_json_lines(tmp_path):
    from metatuner.bench.report import read_log

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
    assert md.read_text().strip() == table(json.loads((out / "results.json").read_text())).strip()
    assert "curves-val-t.png" not in {p.name for p in plots}
