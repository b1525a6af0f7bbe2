"""MetaTuner end to end through the CLI on a tiny model: train, resume, eval --run, generate, export."""

import json

import pytest
import torch

from metatuner.cli import main

TRAIN = [
    "train.steps=5", "train.batch_size=2", "train.rollouts=2", "generator.max_prompt_tokens=4", "train.save_every=1",
    "train.actor_warmup_steps=2", "train.generator_warmup_queries=2", "train.generator_warmup_steps=1",
    "train.lr_static=0.05", "train.lr_hypernet=0.05", "eval.max_new_tokens=4", "data.train_limit=8", "data.val_size=2",
    "train.prompt_branch=always",  # these tests follow every phase of G; tests/test_branch.py tests auto
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "r"
    code = main(["train", "--model", str(tiny_model_dir), "--limit", "3", "--out", str(run_dir), *TRAIN])
    assert code == 0
    return run_dir


def test_train_writes_a_run_folder(trained_run):
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "latest").read_text().strip() == "step-000005"
    phases = {json.loads(line)["phase"] for line in (trained_run / "log.jsonl").read_text().splitlines()}
    assert phases == {"plan", "warmup_actor", "warmup_generator", "joint", "eval"}
    summary = json.loads((trained_run / "eval-test" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["predictor"]["has_static"] is True
    assert (trained_run / "tb").is_dir()


def test_train_refuses_to_overwrite_and_resume_needs_a_run(capsys, trained_run, tmp_path):
    assert main(["train", "--out", str(trained_run)]) == 2
    assert "already exists; use --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_resume_of_a_finished_run_adds_no_steps(capsys, trained_run):
    before = (trained_run / "log.jsonl").read_text()
    evaluated = (trained_run / "eval-test" / "summary.json").read_text()
    assert main(["train", "--resume", str(trained_run)]) == 0
    assert (trained_run / "log.jsonl").read_text() == before
    assert f"already evaluated: {trained_run / 'eval-test'}" in capsys.readouterr().out
    assert (trained_run / "eval-test" / "summary.json").read_text() == evaluated


def test_a_run_folder_has_one_owner(capsys, trained_run):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metatuner import locks; "
         "l = locks.try_lock(sys.argv[1]); print(bool(l), flush=True); time.sleep(60)", str(trained_run / "run.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert main(["train", "--resume", str(trained_run)]) == 2
        err = capsys.readouterr().err
        assert f"run folder {trained_run} is in use by pid {holder.pid}" in err and err.count("\n") == 1
    finally:
        holder.kill()  # like kill -9: the lock file stays, its lock goes with the process
        holder.wait()
    assert (trained_run / "run.lock").is_file()
    assert main(["train", "--resume", str(trained_run)]) == 0  # a dead owner's lock is taken over
    assert not (trained_run / "run.lock").exists()


def test_no_eval_is_kept_by_resume(tmp_path, tiny_model_dir):
    import yaml

    run_dir = tmp_path / "r"
    assert main(["train", "--model", str(tiny_model_dir), "--out", str(run_dir), "--no-eval", "train.steps=2",
                 "train.actor_warmup_steps=1", "train.generator_warmup_queries=0", "train.batch_size=2",
                 "data.train_limit=4", "data.val_size=0"]) == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["after_training"] is False
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert not (run_dir / "eval-test").exists()


def test_eval_run_and_generate(capsys, trained_run, tmp_path):
    assert main(["eval", "--run", str(trained_run), "--limit", "2", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["n"] == 2
    capsys.readouterr()
    assert main(["generate", "--run", str(trained_run), "--question", "Mia has 3 apples. How many?"]) == 0
    out = capsys.readouterr().out
    assert "prompt:" in out and "answer:" in out


def test_export_gives_peft_the_same_logits(trained_run, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from metatuner.evaluation.generation import render_chat
    from metatuner.recipes import load_run
    from metatuner.tasks import Example, get_task

    query = "Leo has 4 boxes with 3 cards in each box. How many cards does Leo have?"
    assert main(["export", "--run", str(trained_run), "--query", query, "--out", str(tmp_path / "adapter")]) == 0
    mt, cfg = load_run(trained_run)
    task = get_task("arithmetic")
    example = Example("q", query, "", "")
    prompt = (tmp_path / "adapter" / "prompt.txt").read_text().strip()
    text = render_chat(mt.tokenizer, task.messages(prompt, example))
    ids = mt.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), mt.as_actor(mt.factors(mt.encode(task, [example]))):
        ours = mt.actor(ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        plain = base(ids).logits
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["sft", "metatuner"])
def test_trained_methods_through_eval(capsys, tmp_path, tiny_model_dir, method):
    out = tmp_path / method
    code = main(["eval", "--method", method, "--model", str(tiny_model_dir), "--limit", "2", "--out", str(out),
                 *TRAIN])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predictor"]["method"] == method and summary["n"] == 2
    log = [json.loads(line) for line in (tmp_path / f"{method}-train" / "log.jsonl").read_text().splitlines()]
    # one budget of train.steps=5: sft spends all of it on SFT; metatuner 2 on M's warm-up, 1 on G's, 2 joint
    warm = [r["step"] for r in log if r["phase"] == "warmup_actor"]
    joint = [r["step"] for r in log if r["phase"] == "joint"]
    if method == "sft":
        assert warm == [1, 2, 3, 4, 5] and joint == []
    else:
        assert warm == [1, 2] and [r["step"] for r in log if r["phase"] == "warmup_generator" and "generator_sft_loss" in r] == [3]
        assert joint == [4, 5]
        final = [r for r in log if r["phase"] == "eval"][-1]
        assert final["step"] == 5 and final["gate"] in ("generated", "initial") and "delta_spread" in final
