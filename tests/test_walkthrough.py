"""The README's walk-through, from a user's JSONL through train, eval, predict and serve to an `openai` client
call, run command by command as written (on a tiny model with a tiny training budget added), so it stays true."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from metatuner.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {  # appended to the README's commands: the tiny model, and a training budget it finishes in seconds
    "train": ["train.steps=4", "train.batch_size=2", "train.rollouts=2", "generator.max_prompt_tokens=6",
              "train.actor_warmup_steps=2", "train.generator_warmup_queries=2", "train.generator_warmup_steps=1",
              "data.train_limit=8", "data.val_size=2"],
    "eval": ["eval.limit=3", "eval.max_new_tokens=4"],
}


def walkthrough() -> tuple[list[list[str]], str]:
    """The README's walk-through: its shell commands (split into arguments) and its Python snippet."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- walkthrough:start -->"):text.index("<!-- walkthrough:end -->")]
    bash, python = re.findall(r"```(?:bash|python)\n(.*?)```", block, re.S)
    commands = [shlex.split(line, comments=True) for line in bash.splitlines() if line.strip()]
    return commands, python


def test_the_readme_walkthrough_runs(tmp_path, monkeypatch, tiny_tokenizer):
    from conftest import make_model

    model = tmp_path / "model"
    make_model(tiny_tokenizer, init_range=0.2).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)  # the README's relative paths (runs/..., examples/...) resolve here
    commands, snippet = walkthrough()
    assert [c[:2] for c in commands] == [["metatuner", "tasks"], ["metatuner", "train"], ["metatuner", "eval"],
                                         ["metatuner", "predict"], ["metatuner", "serve"]]
    *offline, serve = commands
    for command in offline:
        argv = command[1:] + (["--model", str(model)] if command[1] == "train" else []) + TINY.get(command[1], [])
        assert main(argv) == 0, argv
    predictions = [json.loads(line) for line in (tmp_path / "runs/capitals/predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["malta", "cyprus", "haiti"] and all(p["output"] for p in predictions)

    port = serve[serve.index("--port") + 1]
    argv = [sys.executable, "-m", "metatuner.cli", *serve[1:]]
    argv[argv.index(port)] = "0"  # a free port instead of the README's 8000
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving metatuner, zero-shot at http://127.0.0.1:"), line + proc.stdout.read()
        url = line.split(" at ")[1].split()[0]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet.replace(f"http://127.0.0.1:{port}/v1", url), {})
        malta = predictions[0]  # served = predicted for the same query: the answer, then the prompt
        assert printed.getvalue() == f"{malta['output']}\n{malta['prompt']}\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
