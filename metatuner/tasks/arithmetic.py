"""Arithmetic: a built-in task of short word problems, generated on the fly so it needs no data files.

Each problem takes one or two steps of adding, subtracting or multiplying small numbers, and every
answer is a non-negative integer. Generation is a pure function of the split (train: seed 0, 2000
items; test: seed 1, 500 items) and no test problem text occurs in train. Extraction and scoring are
those of GSM8K ("The answer is N", numeric exact match), which makes this a quick end-to-end check.
"""

from __future__ import annotations

import random
from typing import Any

from metatuner.errors import MetatunerError
from metatuner.tasks.base import SPLITS, TASKS, Example, Task
from metatuner.tasks.numeric import COT_INSTRUCTION, INSTRUCTION, extract_numeric, score_numeric

SEEDS = {"train": 0, "test": 1}
SIZES = {"train": 2000, "test": 500}

NAMES = (
    ("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"), ("Omar", "He"),
    ("Lena", "She"), ("Sam", "He"), ("Ines", "She"), ("Raj", "He"), ("Yuki", "She"), ("Tom", "He"),
)
THINGS = (
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "coins", "stamps",
)


def _buy(r: random.Random, name: str, pron: str, thing: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 60), r.randint(2, 40)
    return (f"{name} has {a} {thing}. {pron} buys {b} more. How many {thing} does {name} have now?",
            [f"{a} + {b} = {a + b}."], a + b)


def _give(r: random.Random, name: str, pron: str, thing: str) -> tuple[str, list[str], int]:
    a = r.randint(5, 80)
    b = r.randint(1, a)
    return (f"{name} has {a} {thing} and gives {b} of them to a friend. "
            f"How many {thing} does {name} have left?",
            [f"{a} - {b} = {a - b}."], a - b)


def _boxes(r: random.Random, name: str, pron: str, thing: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    return (f"{name} has {a} boxes with {b} {thing} in each box. How many {thing} does {name} have?",
            [f"{a} * {b} = {a * b}."], a * b)


def _buy_and_give(r: random.Random, name: str, pron: str, thing: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 50), r.randint(2, 30)
    c = r.randint(1, a + b)
    return (f"{name} has {a} {thing}. {pron} buys {b} more and gives {c} to a friend. "
            f"How many {thing} does {name} have now?",
            [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c)


def _lose_and_find(r: random.Random, name: str, pron: str, thing: str) -> tuple[str, list[str], int]:
    a = r.randint(5, 60)
    b, c = r.randint(1, a), r.randint(1, 30)
    return (f"{name} had {a} {thing}. {pron} lost {b} of them and then found {c}. "
            f"How many {thing} does {name} have now?",
            [f"{a} - {b} = {a - b}.", f"{a - b} + {c} = {a - b + c}."], a - b + c)


def _packs_and_eat(r: random.Random, name: str, pron: str, thing: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 9), r.randint(2, 12)
    c = r.randint(1, a * b)
    return (f"{name} buys {a} packs of {thing} with {b} {thing} in each pack. {pron} gives away {c} of them. "
            f"How many {thing} does {name} keep?",
            [f"{a} * {b} = {a * b}.", f"{a * b} - {c} = {a * b - c}."], a * b - c)


def _together(r: random.Random, name: str, pron: str, thing: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 40), r.randint(1, 20)
    friend = r.choice([n for n, _ in NAMES if n != name])
    return (f"{name} has {a} {thing}. {friend} has {b} more {thing} than {name}. "
            f"How many {thing} do they have together?",
            [f"{a} + {b} = {a + b}.", f"{a} + {a + b} = {2 * a + b}."], 2 * a + b)


TEMPLATES = (_buy, _give, _boxes, _buy_and_give, _lose_and_find, _packs_and_eat, _together)


def _problems(seed: int, count: int, exclude: frozenset[str]) -> list[dict[str, Any]]:
    """``count`` distinct problems drawn with ``random.Random(seed)``, none with a text in ``exclude``."""
    r = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < count:
        name, pron = r.choice(NAMES)
        question, steps, answer = r.choice(TEMPLATES)(r, name, pron, r.choice(THINGS))
        if question in seen or question in exclude:
            continue
        seen.add(question)
        rows.append({"question": question, "steps": steps, "answer": answer})
    return rows


def generate(split: str) -> list[dict[str, Any]]:
    """The raw rows of a split: ``id``, ``question``, ``answer`` (as text) and ``solution``."""
    exclude = frozenset(row["question"] for row in generate("train")) if split == "test" else frozenset()
    return [
        {
            "id": f"arithmetic-{split}-{i}",
            "question": p["question"],
            "answer": str(p["answer"]),
            "solution": " ".join(p["steps"]) + f" The answer is {p['answer']}.",
        }
        for i, p in enumerate(_problems(SEEDS[split], SIZES[split], exclude))
    ]


@TASKS.register("arithmetic")
class Arithmetic(Task):
    """Generated one- and two-step word problems; scored like GSM8K."""

    name = "arithmetic"
    instruction = INSTRUCTION
    cot_instruction = COT_INSTRUCTION
    max_new_tokens = 48
    cot_max_new_tokens = 128
    required_fields = ("id", "question", "answer", "solution")
    primary_metric = "exact_match_flexible"
    metric = "numeric"

    def load(self, split: str) -> list[Example]:
        """Generates the split; the data folder is not used."""
        if split not in SPLITS:
            raise MetatunerError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
        return [self.example_from_row(row) for row in generate(split)]

    def card(self) -> dict[str, Any]:
        return {**super().card(), "data": "built in: generated word problems, no files"}

    def example_from_row(self, row: dict[str, Any]) -> Example:
        return Example(id=row["id"], query=row["question"], answer=row["answer"], target=row["solution"])

    def extract(self, output: str) -> dict[str, str | None]:
        return extract_numeric(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return score_numeric(extracted, example.answer)
