"""The Python API end to end: a task built from a list of dicts with a metric written in Python, MetaTuner
trained on it, questions answered, one query's adapter exported as a PEFT folder, and the test rows scored.

    python examples/python_api.py            # SmolLM2-135M, 12 training steps: a few minutes on a CPU

``tests/test_examples.py`` runs :func:`main` on a tiny model with two training steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import metatuner

ROWS = [
    {"country": "France", "capital": "Paris"}, {"country": "Japan", "capital": "Tokyo"},
    {"country": "Italy", "capital": "Rome"}, {"country": "Spain", "capital": "Madrid"},
    {"country": "Egypt", "capital": "Cairo"}, {"country": "Kenya", "capital": "Nairobi"},
    {"country": "Peru", "capital": "Lima"}, {"country": "Norway", "capital": "Oslo"},
    {"country": "Greece", "capital": "Athens"}, {"country": "Chile", "capital": "Santiago"},
    {"country": "Cuba", "capital": "Havana"}, {"country": "Poland", "capital": "Warsaw"},
    {"country": "Austria", "capital": "Vienna"}, {"country": "Portugal", "capital": "Lisbon"},
    {"country": "Ireland", "capital": "Dublin"}, {"country": "Thailand", "capital": "Bangkok"},
]


def same_city(output: str, answer: str) -> float:
    """The metric: 1 when the gold city is named in the model's output, else 0."""
    return float(answer.lower() in output.lower())


def main(out: str | Path = "runs/python-api", **overrides) -> metatuner.Run:
    """Builds the task, trains, answers, exports and evaluates; ``overrides`` are config overrides
    (``model={"name": ...}``, ``train={"steps": 2}``) on top of the shipped ``quick`` config."""
    out = Path(out)
    task = metatuner.make_task(
        train=ROWS[:12], test=ROWS[12:],
        template="What is the capital of {country}?", answer="capital", metric=same_city, name="capitals",
        instruction="Answer with the name of the city only.", max_new_tokens=16,
    )
    settings = metatuner.load_config("quick", {"data.val_size": 4}, **overrides)  # 4 of the 12 rows validate
    run = metatuner.train(settings, task=task, run_dir=out / "run")
    print(f"trained into {run.run_dir}: {run.results[0].line()}")

    for answer in run.answer(["What is the capital of Peru?", {"country": "Cuba", "capital": "Havana"}]):
        print(f"{answer.query}\n  prompt: {answer.prompt}\n  output: {answer.output}\n  scores: {answer.scores}")

    prompt = run.export_adapter("What is the capital of Peru?", out / "adapter-peru")
    print(f"adapter for Peru: {out / 'adapter-peru'} (prompt: {prompt})")

    result = run.evaluate(out_dir=out / "eval")  # the test rows again, into a results folder
    print(f"test: {result.line()}")
    return run


if __name__ == "__main__":
    main(*sys.argv[1:2])
