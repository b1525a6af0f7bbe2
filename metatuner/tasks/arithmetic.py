"""Arithmetic: a built-in task of short word problems, generated on the fly so it needs no data files.

Each problem takes one or two steps of adding, subtracting or multiplying small numbers (an *operation*
fixes the number ranges and the steps), written in a sentence *frame* with a name and an object, and
every answer is a non-negative integer. Generation is a pure function of the split and needs no files:

- ``train`` (seed 0, 2000 items) and ``test`` (seed 1, 500 items) share the ordinary vocabulary
  (:data:`ORDINARY`: one frame per operation, 12 names, 10 objects); no test problem text occurs in train;
- ``test_shift`` (seed 2, 500 items) is the *template-shift* test: the same operations (so the same
  number ranges and steps, drawn as often), written in other frames with other names and objects
  (:data:`SHIFTED`), none of which occurs in train. It shows whether a method learned the skill or the
  templates.

Extraction and scoring are those of GSM8K ("The answer is N", numeric exact match).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from metatuner.tasks.base import TASKS, Example, Task
from metatuner.tasks.numeric import COT_INSTRUCTION, INSTRUCTION, extract_numeric, score_numeric

SPLITS = ("train", "test", "test_shift")
SEEDS = {"train": 0, "test": 1, "test_shift": 2}
SIZES = {"train": 2000, "test": 500, "test_shift": 500}

# an operation draws its numbers: (values for the frame's {a}, {b}, {c}; worked steps; answer)
Operation = Callable[[random.Random], tuple[dict[str, int], list[str], int]]


def _add(r: random.Random):
    a, b = r.randint(2, 60), r.randint(2, 40)
    return {"a": a, "b": b}, [f"{a} + {b} = {a + b}."], a + b


def _subtract(r: random.Random):
    a = r.randint(5, 80)
    b = r.randint(1, a)
    return {"a": a, "b": b}, [f"{a} - {b} = {a - b}."], a - b


def _multiply(r: random.Random):
    a, b = r.randint(2, 12), r.randint(2, 12)
    return {"a": a, "b": b}, [f"{a} * {b} = {a * b}."], a * b


def _add_subtract(r: random.Random):
    a, b = r.randint(2, 50), r.randint(2, 30)
    c = r.randint(1, a + b)
    return {"a": a, "b": b, "c": c}, [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c


def _subtract_add(r: random.Random):
    a = r.randint(5, 60)
    b, c = r.randint(1, a), r.randint(1, 30)
    return {"a": a, "b": b, "c": c}, [f"{a} - {b} = {a - b}.", f"{a - b} + {c} = {a - b + c}."], a - b + c


def _multiply_subtract(r: random.Random):
    a, b = r.randint(2, 9), r.randint(2, 12)
    c = r.randint(1, a * b)
    return {"a": a, "b": b, "c": c}, [f"{a} * {b} = {a * b}.", f"{a * b} - {c} = {a * b - c}."], a * b - c


def _more_than(r: random.Random):
    a, b = r.randint(2, 40), r.randint(1, 20)
    return {"a": a, "b": b}, [f"{a} + {b} = {a + b}.", f"{a} + {a + b} = {2 * a + b}."], 2 * a + b


OPERATIONS: tuple[Operation, ...] = (_add, _subtract, _multiply, _add_subtract, _subtract_add,
                                     _multiply_subtract, _more_than)


@dataclass(frozen=True)
class Vocabulary:
    """What a split's problems are written with: one sentence frame per operation (in the order of
    :data:`OPERATIONS`; slots ``{name}``, ``{pron}`` (capitalised pronoun), ``{pron_l}``, ``{thing}``,
    ``{friend}`` (another name) and the operation's numbers), the names with their pronouns, and the objects."""

    frames: tuple[str, ...]
    names: tuple[tuple[str, str], ...]
    things: tuple[str, ...]


ORDINARY = Vocabulary(
    frames=(
        "{name} has {a} {thing}. {pron} buys {b} more. How many {thing} does {name} have now?",
        "{name} has {a} {thing} and gives {b} of them to a friend. How many {thing} does {name} have left?",
        "{name} has {a} boxes with {b} {thing} in each box. How many {thing} does {name} have?",
        "{name} has {a} {thing}. {pron} buys {b} more and gives {c} to a friend. "
        "How many {thing} does {name} have now?",
        "{name} had {a} {thing}. {pron} lost {b} of them and then found {c}. How many {thing} does {name} have now?",
        "{name} buys {a} packs of {thing} with {b} {thing} in each pack. {pron} gives away {c} of them. "
        "How many {thing} does {name} keep?",
        "{name} has {a} {thing}. {friend} has {b} more {thing} than {name}. How many {thing} do they have together?",
    ),
    names=(("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"), ("Omar", "He"),
           ("Lena", "She"), ("Sam", "He"), ("Ines", "She"), ("Raj", "He"), ("Yuki", "She"), ("Tom", "He")),
    things=("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "coins", "stamps"),
)

SHIFTED = Vocabulary(
    frames=(
        "At first {name} owned {a} {thing}. Later {pron_l} received {b} extra. What is the total number of "
        "{thing} that {name} owns?",
        "There were {a} {thing} in {name}'s bag. {pron} handed out {b}. What number of {thing} stayed in the bag?",
        "A shelf holds {a} rows and each row has {b} {thing}. What is the total count of {thing} on the shelf?",
        "A jar contained {a} {thing}. {name} put in {b} extra, then took out {c}. What number of {thing} is in "
        "the jar at the end?",
        "{name} started the week with {a} {thing}, used up {b} of them, and then got {c} as a gift. What is "
        "the number of {thing} {name} owns at the end of the week?",
        "{name} fills {a} baskets, placing {b} {thing} into every basket. Then {pron_l} sells {c} {thing}. "
        "What number of {thing} remains unsold?",
        "{friend} owns {b} {thing} more than {name}, who owns {a}. What is the combined number of {thing} "
        "owned by the pair?",
    ),
    names=(("Bruno", "He"), ("Carla", "She"), ("Dmitri", "He"), ("Elif", "She"), ("Felix", "He"),
           ("Greta", "She"), ("Hugo", "He"), ("Iris", "She"), ("Jonas", "He"), ("Kira", "She")),
    things=("buttons", "feathers", "tickets", "beads", "pebbles", "candles", "badges", "ribbons"),
)

VOCABULARY = {"train": ORDINARY, "test": ORDINARY, "test_shift": SHIFTED}


def word_problem(r: random.Random, vocab: Vocabulary) -> tuple[str, list[str], int]:
    """One problem drawn with ``r`` from ``vocab``: (question, worked steps, answer)."""
    name, pron = r.choice(vocab.names)
    k = r.randrange(len(OPERATIONS))
    thing = r.choice(vocab.things)
    values, steps, answer = OPERATIONS[k](r)
    frame = vocab.frames[k]
    friend = r.choice([n for n, _ in vocab.names if n != name]) if "{friend}" in frame else ""
    question = frame.format(name=name, pron=pron, pron_l=pron.lower(), thing=thing, friend=friend, **values)
    return question, steps, answer


def _problems(seed: int, count: int, vocab: Vocabulary, exclude: frozenset[str]) -> list[dict[str, Any]]:
    """``count`` distinct problems drawn with ``random.Random(seed)``, none with a text in ``exclude``."""
    r = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < count:
        question, steps, answer = word_problem(r, vocab)
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
        for i, p in enumerate(_problems(SEEDS[split], SIZES[split], VOCABULARY[split], exclude))
    ]


@TASKS.register("arithmetic")
class Arithmetic(Task):
    """Generated one- and two-step word problems; scored like GSM8K."""

    name = "arithmetic"
    instruction = INSTRUCTION
    cot_instruction = COT_INSTRUCTION
    max_new_tokens = 48
    cot_max_new_tokens = 128
    splits = SPLITS
    required_fields = ("id", "question", "answer", "solution")
    primary_metric = "exact_match_flexible"
    metric = "numeric"

    def load(self, split: str) -> list[Example]:
        """Generates the split; the data folder is not used."""
        self.check_split(split)
        return [self.example_from_row(row) for row in generate(split)]

    def card(self) -> dict[str, Any]:
        return {**super().card(), "data": "built in: generated word problems, no files"}

    def example_from_row(self, row: dict[str, Any]) -> Example:
        return Example(id=row["id"], query=row["question"], answer=row["answer"], target=row["solution"])

    def extract(self, output: str) -> dict[str, str | None]:
        return extract_numeric(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return score_numeric(extracted, example.answer)
