"""The validation gate, shown to open as well as to close, and prompts that state an answer never reach M.

A scripted G writes one fixed output per query; a scripted M (the answers of the harness's generate)
reverses the word of a "reverse" task only when the hint is in its prompt, and otherwise repeats it. So
on validation the hint scores 100% and p~ 0%: the gate must open, and every way a trained run answers
(``generate``, ``predict``, ``serve``, ``export``) must then use G's prompt. A hint that does not help
must leave the gate closed (p~ everywhere), and a hint that states an answer must be replaced by p~ in
the task loss, evaluation, serving and export, and be counted (``prompt_stated_answer``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from metatuner.cli import main
from metatuner.evaluation.gate import gate_opens
from metatuner.evaluation.generation import Generation
from metatuner.models.metatuner import MetaTuner
from metatuner.tasks import Example, get_task
from metatuner.tasks.leaks import leaks, states_answer

HINT = "Read the word from its last letter."
WORDS = ["stone", "river", "cloud", "maple", "tiger", "lemon", "piano", "zebra", "candle", "garden", "pencil", "rocket"]
INSTRUCTION = "Reply in the form 'The answer is X.'"
TRAIN = [
    "train.steps=4", "train.batch_size=2", "train.rollouts=2", "generator.max_prompt_tokens=8", "train.save_every=4",
    "train.actor_warmup_steps=1", "train.generator_warmup_queries=2", "train.generator_warmup_steps=1",
    "data.val_size=4", "train.gate_margin=0.05", "train.max_length=256",
    "train.prompt_branch=always",  # the gate decides here, not the branch's own retirement (tests/test_branch.py)
]


def test_the_gate_rule_is_strict():
    assert gate_opens(0.6, 0.5, 0.05) and not gate_opens(0.55, 0.5, 0.05) and not gate_opens(0.5, 0.5, 0.0)
    assert gate_opens(0.51, 0.5, 0.0)


@pytest.fixture()
def reverse_task(tmp_path) -> str:
    rows = [{"id": f"w{i}", "word": w, "reversed": w[::-1]} for i, w in enumerate(WORDS)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    (tmp_path / "reverse.yaml").write_text(
        "name: reverse\ndata:\n  train: train.jsonl\n  test: test.jsonl\ntemplate: 'Reverse the word {word}.'\n"
        f"answer: reversed\ninstruction: \"{INSTRUCTION}\"\nmax_new_tokens: 16\nmetric: exact\n"
    )
    return f"file:{tmp_path / 'reverse.yaml'}"


def script(monkeypatch, output) -> None:
    """G writes ``output(example)`` for every query (sampled or greedy); M reverses the word only when HINT
    is in its input."""

    def outputs(self, task, examples, *, sample=False, n=1, temperature=1.0, frozen=False):
        return [Generation(output(ex), 5) for ex in examples for _ in range(n)]

    def mixed(self, task, sampled, n, temperature, greedy):
        return outputs(self, task, sampled, n=n), outputs(self, task, greedy)

    def answers(model, tokenizer, texts, max_new_tokens, stop=(), **kw):
        found = [re.search(r"Reverse the word (\w+)\.", t).group(1) for t in texts]
        return [Generation(f"The answer is {w[::-1] if HINT in t else w}.", 6) for w, t in zip(found, texts)]

    monkeypatch.setattr(MetaTuner, "generate_outputs", outputs)
    monkeypatch.setattr(MetaTuner, "generate_mixed", mixed)
    monkeypatch.setattr("metatuner.evaluation.predictors.generate", answers)


def train(tmp_path, task, model_dir, *extra) -> Path:
    run = tmp_path / "run"
    assert main(["train", "--task", task, "--model", str(model_dir), "--out", str(run), "--no-eval", *TRAIN, *extra]) == 0
    return run


def final_eval(run: Path) -> dict:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"phase": "eval"' in line][-1]


def scores(record: dict) -> tuple[float, float]:
    """The final validation's scores with G's prompts and with p~."""
    [initial] = [k for k in record if k.startswith("val_") and k.endswith("_initial")]
    return record[initial.removesuffix("_initial")], record[initial]


def served_prompt(run: Path, query: str) -> str:
    """The prompt the OpenAI-compatible server reports for ``query`` (a real client on a localhost port)."""
    from metatuner.config import ServeConfig
    from metatuner.recipes import named_predictors
    from metatuner.serving.engine import Engine, Served
    from metatuner.serving.server import create_app
    from test_serving import client, running

    found, _ = named_predictors(run, [], None)
    engine = Engine({n: Served(p, t) for n, (p, t) in found.items()}, 4, 10)
    with running(create_app(engine, ServeConfig(), api_key=None)) as url:
        chat = client(url, "none").chat.completions.create(model="metatuner", messages=[{"role": "user", "content": query}])
    return chat.model_extra["metatuner"]["prompt"]


def every_served_prompt(run: Path, tmp_path: Path, word: str) -> dict[str, str]:
    """The prompt that ``generate``, ``predict``, ``serve`` and ``export`` use for the query of ``word``."""
    query = f"Reverse the word {word}."
    out = tmp_path / "generated.jsonl"
    assert main(["generate", "--run", str(run), "--question", query, "--output", str(out)]) == 0
    source = tmp_path / "queries.jsonl"
    source.write_text(json.dumps({"id": "q", "word": word}) + "\n")
    assert main(["predict", "--run", str(run), "--input", str(source), "--out", str(tmp_path / "predicted.jsonl")]) == 0
    assert main(["export", "--run", str(run), "--query", query, "--out", str(tmp_path / "adapter")]) == 0
    return {
        "generate": json.loads(out.read_text())["prompt"],
        "predict": json.loads((tmp_path / "predicted.jsonl").read_text())["prompt"],
        "serve": served_prompt(run, query),
        "export": json.loads((tmp_path / "adapter" / "query.json").read_text())["prompt"],
    }


def test_the_gate_opens_for_prompts_that_help_and_every_entry_point_serves_them(reverse_task, tiny_model_dir,
                                                                                   tmp_path, monkeypatch):
    script(monkeypatch, lambda ex: HINT)
    run = train(tmp_path, reverse_task, tiny_model_dir)
    record = final_eval(run)
    assert record["gate"] == "generated"
    assert scores(record) == (1.0, 0.0)
    prompts = every_served_prompt(run, tmp_path, "apple")
    assert prompts == dict.fromkeys(prompts, f"{INSTRUCTION} {HINT}")  # append mode: p~ plus G's hint


def test_the_gate_stays_closed_for_prompts_that_do_not_help(reverse_task, tiny_model_dir, tmp_path, monkeypatch):
    script(monkeypatch, lambda ex: "Take your time.")  # M answers alike with or without it: a tie serves p~
    run = train(tmp_path, reverse_task, tiny_model_dir)
    record = final_eval(run)
    assert record["gate"] == "initial" and scores(record) == (0.0, 0.0)
    prompts = every_served_prompt(run, tmp_path, "apple")
    assert prompts == dict.fromkeys(prompts, INSTRUCTION)


def test_an_output_that_states_an_answer_is_replaced_by_p_tilde_everywhere(reverse_task, tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    # a hint that also guesses an answer: without the guard, M would read HINT and answer right
    script(monkeypatch, lambda ex: f"{HINT} The answer is {ex.query.split()[-1].rstrip('.')[::-1]}.")
    run = train(tmp_path, reverse_task, tiny_model_dir, "train.gate=false", "train.rollout_every=100")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    joint = [r for r in log if r["phase"] == "joint"]
    assert joint and all(r["prompt_stated_answer"] == 2 for r in joint)  # both queries of every task-loss batch
    record = final_eval(run)
    assert record["prompt_stated_answer"] == 1.0 and record["prompt_equal_initial"] == 1.0
    assert [v for k, v in record.items() if k.startswith("val_")] == [0.0]  # M never saw the hint
    prompts = every_served_prompt(run, tmp_path, "apple")
    assert prompts == dict.fromkeys(prompts, INSTRUCTION)


# ---- what counts as stating an answer -------------------------------------------------------------------
def test_numbers_stated_as_answers():
    task = get_task("arithmetic")
    ex = Example("a", "Mia has 3 apples and buys 4. How many?", "7", "")
    for hint in ("The answer to this question is 11.", "Answer: 12", "The answer is 7", "The final answer = 3"):
        assert states_answer(task, ex, hint), hint
    for hint in ("Add the two numbers.", "The answer should be a whole number.", "Mia has 3 apples; add 4.",
                 task.instruction, "End with 'The answer is N'."):
        assert not states_answer(task, ex, hint), hint


def test_phrases_stated_as_answers():
    task = get_task("hotpotqa")
    ex = Example("h", "Which city is the capital of France?", "Paris", "")
    for hint in ("The answer is Paris.", "The answer should be London", "I think the answer is: the Seine"):
        assert states_answer(task, ex, hint), hint
    for hint in ("Answer with a short phrase.", task.instruction, "Give the answer in the form 'The answer is X.'",
                 "Think about European capitals."):
        assert not states_answer(task, ex, hint), hint
    assert leaks(task, ex, "Think of Paris.") and not states_answer(task, ex, "Think of Paris.")  # needs the gold


def test_option_letters_on_a_letter_task():
    task = get_task("cosmosqa")
    ex = Example("c", "Context: ...\nQuestion: why?\nOptions:\nA) rain\nB) sun\nC) snow\nD) wind", "B", "",
                 options=("rain", "sun", "snow", "wind"))
    for hint in ("Option B is correct.", "Choose C.", "The best choice is (D).", "B is right.", "Pick A)."):
        assert states_answer(task, ex, hint), hint
    for hint in ("A careful reading helps.", "Pick one option.", "Reply with one letter.", task.instruction,
                 "Compare each option with the context."):
        assert not states_answer(task, ex, hint), hint
    plain = Example("p", "Why is the sky blue?", "", "")  # no options: letters mean nothing
    assert not states_answer(get_task("hotpotqa"), plain, "Option B is correct.")
