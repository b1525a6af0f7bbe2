"""Mixture: a built-in heterogeneous task of six generated families, one instruction for all of them.

Every item carries the same initial instruction p~ (:data:`INSTRUCTION`), so whatever a method adapts per
query must come from the query itself. The families differ in skill and in answer format:

| family | skill | answer format | example |
|---|---|---|---|
| ``arithmetic`` | one- and two-step word problems (the ``arithmetic`` task's operations) | number | "... How many apples does Mia have now?" -> 37 |
| ``letters`` | counting a letter in a word | number | "How many times does the letter 'a' appear in the word 'banana'?" -> 3 |
| ``sorting`` | sorting three or four numbers up or down | numbers | "Sort these numbers from smallest to largest: 7, 3, 12." -> 3, 7, 12 |
| ``units`` | converting 2-9 of a unit into a smaller one | number | "How many minutes are in 3 hours?" -> 180 |
| ``weekdays`` | the weekday 1-9 days after or before a given one | weekday | "Today is Monday. What day of the week will it be in 3 days?" -> Thursday |
| ``choice`` | picking the member of a category among four options | letter | "Which of these is a fruit?\\nA) chair ..." -> B |

Each Example keeps its family in ``meta["family"]``; the harness reports every metric per family too
(``exact_match_flexible/family=weekdays``). Answers are graded in the family's format
(:mod:`metatuner.tasks.answers`); the supervised target is a short worked solution ending in
"The answer is X." Items are easy on purpose (short numbers, short words), so that a fine-tuned 135M
model can learn them and methods can separate.

Splits, generated from seeds, with families in turn (item ``i`` has family ``i mod 6``):
``train`` (seed 0, 2000 items) and ``test`` (seed 1, 500 items, no question text of train) draw from the
ordinary vocabulary; ``test_shift`` (seed 2, 500 items) is the template-shift test: the same families,
number ranges and steps, written in sentence frames, with names and objects (words to spell, option
items), none of which occurs in train. ``test_extra`` (seed 3, 1800 items, ordinary vocabulary, no question
text of train or test) gives 300 items of each family: enough to test one held-out family
(``mixture-without-weekdays>mixture-only-weekdays`` with ``eval.splits: [test_extra]``) with power.

The families are written here rather than taken from ``reasoning-gym``: its generators fix their own
wording, so they cannot keep a split's frames, names and objects apart from train's, nor hold every
answer to one instruction's format; and it pins nine further packages (ARC data, a Rubik's cube, a SAT
solver among them) for six small generators.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from metatuner.tasks import answers
from metatuner.tasks.arithmetic import ORDINARY, SHIFTED
from metatuner.tasks.arithmetic import Vocabulary as WordProblems
from metatuner.tasks.arithmetic import word_problem
from metatuner.errors import MetatunerError
from metatuner.tasks.base import TASKS, Example, Task
from metatuner.tasks.cosmosqa import LETTERS

INSTRUCTION = (
    "Answer the question and end with 'The answer is X', where X is only the final answer: "
    "a number, a list of numbers, a weekday or an option letter."
)
COT_INSTRUCTION = (
    "Let's think step by step. Work the question out, then end with 'The answer is X', where X is only "
    "the final answer: a number, a list of numbers, a weekday or an option letter."
)
SPLITS = ("train", "test", "test_shift", "test_extra")
SEEDS = {"train": 0, "test": 1, "test_shift": 2, "test_extra": 3}
SIZES = {"train": 2000, "test": 500, "test_shift": 500, "test_extra": 1800}
FORMATS = {"arithmetic": "number", "letters": "number", "sorting": "numbers", "units": "number",
           "weekdays": "weekday", "choice": "letter"}
FAMILIES = tuple(FORMATS)

# (singular, plural, smaller unit, factor): the skill, shared by every split
UNITS = (("metre", "metres", "centimetres", 100), ("kilogram", "kilograms", "grams", 1000),
         ("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60), ("day", "days", "hours", 24),
         ("week", "weeks", "days", 7), ("foot", "feet", "inches", 12), ("litre", "litres", "millilitres", 1000))
# the category as written in a question, its article included
CATEGORIES = ("a fruit", "an animal", "a vehicle", "a tool", "a musical instrument", "a piece of furniture")


@dataclass(frozen=True)
class Vocabulary:
    """What one split's items are written with. Frames are format strings; a frame's flag is the
    direction it asks for (sorting: ascending; weekdays: forward in time)."""

    word_problems: WordProblems  # the arithmetic family's frames, names (every family's names) and objects
    letter_frames: tuple[str, ...]
    words: tuple[str, ...]
    sorting_frames: tuple[tuple[str, bool], ...]
    unit_frames: tuple[str, ...]
    weekday_frames: tuple[tuple[str, bool], ...]
    choice_frames: tuple[str, ...]
    items: tuple[tuple[str, ...], ...]  # per category of CATEGORIES, its members

    @property
    def names(self) -> tuple[tuple[str, str], ...]:
        return self.word_problems.names


ORDINARY_MIX = Vocabulary(
    word_problems=ORDINARY,
    letter_frames=("How many times does the letter '{letter}' appear in the word '{word}'?",
                   "{name} writes the word '{word}'. How many times does the letter '{letter}' occur in it?"),
    words=("banana", "letter", "rabbit", "summer", "window", "yellow", "pepper", "cotton", "butter", "kitten",
           "mirror", "tomato", "potato", "coffee", "dinner", "garden", "forest", "planet", "silver", "bottle",
           "carrot", "puzzle", "hammer", "pillow", "tunnel", "anchor", "basket", "apple", "paper", "river",
           "sister", "orange", "monkey", "pocket", "dollar", "season", "bread", "tree", "moon", "salad"),
    sorting_frames=(("Sort these numbers from smallest to largest: {nums}.", True),
                    ("Sort these numbers from largest to smallest: {nums}.", False),
                    ("{name} wrote down the numbers {nums}. List them from smallest to largest.", True),
                    ("{name} wrote down the numbers {nums}. List them from largest to smallest.", False)),
    unit_frames=("How many {small} are in {a} {big}?", "{name} has {a} {big}. How many {small} is that?"),
    weekday_frames=(("Today is {day}. What day of the week will it be in {days}?", True),
                    ("{name}'s trip starts on {day} and ends {days} later. On which day of the week does it end?",
                     True),
                    ("Today is {day}. What day of the week was it {days} ago?", False),
                    ("{name} finished a book on {day}. {pron} started it {days} earlier. On which day of the "
                     "week did {pron_l} start it?", False)),
    choice_frames=("Which of these is {category}?", "{name} points at one of these. Which one is {category}?"),
    items=(("apple", "banana", "pear", "grape", "orange", "lemon"),
           ("dog", "horse", "tiger", "rabbit", "sheep", "lion"),
           ("car", "bus", "truck", "bicycle", "train", "boat"),
           ("hammer", "saw", "drill", "wrench", "shovel", "rake"),
           ("piano", "guitar", "violin", "drum", "flute", "trumpet"),
           ("chair", "table", "sofa", "bed", "desk", "cupboard")),
)

SHIFTED_MIX = Vocabulary(
    word_problems=SHIFTED,
    letter_frames=("Count how often '{letter}' shows up when {name} spells '{word}'.",
                   "In '{word}', what is the number of '{letter}' letters?"),
    words=("balloon", "cabbage", "giraffe", "pajamas", "mammal", "bubble", "noodle", "coconut", "grammar",
           "sandal", "parrot", "kettle", "vanilla", "lizard", "meadow", "goggles", "pebble", "walrus", "jacket",
           "museum", "cactus", "muffin", "napkin", "dragon", "saddle", "igloo", "ocean", "spoon", "tulip", "wagon"),
    sorting_frames=(("Arrange the following values in ascending order: {nums}.", True),
                    ("Arrange the following values in descending order: {nums}.", False),
                    ("{name}'s scores were {nums}. Put the scores in order, lowest first.", True),
                    ("{name}'s scores were {nums}. Put the scores in order, highest first.", False)),
    unit_frames=("Express {a} {big} in {small}.", "{name} measured {a} {big}. What is that amount in {small}?"),
    weekday_frames=(("The shop opens again {days} after {day}. Which weekday is that?", True),
                    ("{name} mails a parcel on {day}; it arrives {days} afterwards. Which weekday does it arrive?",
                     True),
                    ("Counting back {days} from {day}, which weekday do you reach?", False),
                    ("{name} planted seeds, and {days} later it was {day}. Which weekday were the seeds planted?",
                     False)),
    choice_frames=("Only one option below names {category}. Pick it.",
                   "{name} must find {category} in this list. Which option fits?"),
    items=(("mango", "cherry", "peach", "plum", "kiwi", "melon"),
           ("zebra", "camel", "otter", "wolf", "panda", "moose"),
           ("tram", "van", "scooter", "canoe", "taxi", "yacht"),
           ("chisel", "pliers", "axe", "trowel", "mallet", "crowbar"),
           ("harp", "cello", "banjo", "tuba", "oboe", "ukulele"),
           ("stool", "bench", "wardrobe", "dresser", "cabinet", "couch")),
)

VOCABULARY = {"train": ORDINARY_MIX, "test": ORDINARY_MIX, "test_shift": SHIFTED_MIX, "test_extra": ORDINARY_MIX}

# a family draws one item: (question, target, answer, options)
Item = tuple[str, str, str, tuple[str, ...]]


def _person(r: random.Random, vocab: Vocabulary) -> dict[str, str]:
    name, pron = r.choice(vocab.names)
    return {"name": name, "pron": pron, "pron_l": pron.lower()}


def _arithmetic(r: random.Random, vocab: Vocabulary) -> Item:
    question, steps, answer = word_problem(r, vocab.word_problems)
    return question, " ".join(steps) + f" The answer is {answer}.", str(answer), ()


def _letters(r: random.Random, vocab: Vocabulary) -> Item:
    word = r.choice(vocab.words)
    present = sorted(set(word))
    absent = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word]
    letter = r.choice(present) if r.random() < 0.8 else r.choice(absent)
    n = word.count(letter)
    question = r.choice(vocab.letter_frames).format(letter=letter, word=word, **_person(r, vocab))
    target = (f"{word} is spelled {' '.join(word)}; the letter '{letter}' appears {n} time{'' if n == 1 else 's'}. "
              f"The answer is {n}.")
    return question, target, str(n), ()


def _sorting(r: random.Random, vocab: Vocabulary) -> Item:
    nums = r.sample(range(1, 51), r.choice((3, 4)))
    frame, ascending = r.choice(vocab.sorting_frames)
    question = frame.format(nums=", ".join(map(str, nums)), **_person(r, vocab))
    answer = ", ".join(map(str, sorted(nums, reverse=not ascending)))
    return question, f"The answer is {answer}.", answer, ()


def _units(r: random.Random, vocab: Vocabulary) -> Item:
    one, big, small, factor = r.choice(UNITS)
    a = r.randint(2, 9)
    question = r.choice(vocab.unit_frames).format(a=a, big=big, small=small, **_person(r, vocab))
    target = f"1 {one} = {factor} {small}. {a} * {factor} = {a * factor}. The answer is {a * factor}."
    return question, target, str(a * factor), ()


def _weekdays(r: random.Random, vocab: Vocabulary) -> Item:
    start, n = r.randrange(7), r.randint(1, 9)
    frame, forward = r.choice(vocab.weekday_frames)
    day, end = answers.WEEKDAYS[start], answers.WEEKDAYS[(start + (n if forward else -n)) % 7]
    days = f"{n} day{'' if n == 1 else 's'}"
    question = frame.format(day=day, days=days, **_person(r, vocab))
    return question, f"{day} {'+' if forward else '-'} {days} = {end}. The answer is {end}.", end, ()


def _choice(r: random.Random, vocab: Vocabulary) -> Item:
    cats = r.sample(range(len(CATEGORIES)), 4)  # cats[0] is asked for, the others give the distractors
    options = [(c, r.choice(vocab.items[c])) for c in cats]
    r.shuffle(options)
    right = next(i for i, (c, _) in enumerate(options) if c == cats[0])
    listed = "\n".join(f"{letter}) {item}" for letter, (_, item) in zip(LETTERS, options))
    question = r.choice(vocab.choice_frames).format(category=CATEGORIES[cats[0]], **_person(r, vocab))
    target = f"The {options[right][1]} is {CATEGORIES[cats[0]]}. The answer is {LETTERS[right]}."
    return f"{question}\n{listed}", target, LETTERS[right], tuple(item for _, item in options)


DRAW = {"arithmetic": _arithmetic, "letters": _letters, "sorting": _sorting, "units": _units,
        "weekdays": _weekdays, "choice": _choice}


def generate(split: str) -> list[dict[str, Any]]:
    """The raw rows of a split: ``id``, ``family``, ``question``, ``answer``, ``solution``, ``options``."""
    exclude = {row["question"] for row in generate("train")} if split in ("test", "test_extra") else set()
    if split == "test_extra":
        exclude |= {row["question"] for row in generate("test")}
    r, vocab = random.Random(SEEDS[split]), VOCABULARY[split]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < SIZES[split]:
        family = FAMILIES[len(rows) % len(FAMILIES)]
        question, target, answer, options = DRAW[family](r, vocab)
        if question in seen or question in exclude:
            continue
        seen.add(question)
        rows.append({"id": f"mixture-{split}-{len(rows)}", "family": family, "question": question,
                     "answer": answer, "solution": target, "options": list(options)})
    return rows


@TASKS.register("mixture")
class Mixture(Task):
    """Six generated families under one instruction; graded in each family's answer format."""

    name = "mixture"
    instruction = INSTRUCTION
    cot_instruction = COT_INSTRUCTION
    max_new_tokens = 48
    cot_max_new_tokens = 128
    splits = SPLITS
    required_fields = ("id", "family", "question", "answer", "solution")
    primary_metric = "exact_match_flexible"
    #: no spec-file metric grades all six formats: each item is graded in its family's (``answer_format``)
    metric = "per-family"

    def __init__(self, data_dir=None, families: tuple[str, ...] = FAMILIES):
        super().__init__(data_dir)
        self.families = families

    @classmethod
    def of_families(cls, name: str, data_dir=None) -> "Mixture":
        """The mixture cut to some families, by name: ``mixture-only-weekdays`` keeps the listed families (comma
        separated), ``mixture-without-weekdays,sorting`` drops them. Every split is cut alike, so
        ``mixture-without-weekdays>mixture-only-weekdays`` (a cross-task name) trains on five families and
        tests on the sixth, which no training or validation item is from."""
        kind, _, listed = name.removeprefix(f"{cls.name}-").partition("-")
        chosen = tuple(f.strip() for f in listed.split(",") if f.strip())
        unknown = [f for f in chosen if f not in FAMILIES]
        if kind not in ("only", "without") or not chosen or unknown:
            raise MetatunerError(
                f"bad mixture name {name!r}" + (f": unknown family {unknown[0]!r}" if unknown else "")
                + f"; expected mixture-only-F1,F2 or mixture-without-F1,F2 with families from {', '.join(FAMILIES)}"
            )
        kept = tuple(f for f in FAMILIES if (f in chosen) == (kind == "only"))
        if not kept:
            raise MetatunerError(f"{name!r} leaves no family of the mixture ({', '.join(FAMILIES)})")
        task = cls(data_dir, kept)
        task.name = name
        return task

    def load(self, split: str) -> list[Example]:
        """Generates the split (the data folder is not used), keeping the task's families."""
        self.check_split(split)
        return [self.example_from_row(row) for row in generate(split) if row["family"] in self.families]

    def card(self) -> dict[str, Any]:
        return {**super().card(), "data": f"built in: generated, families {', '.join(self.families)}; no files"}

    def example_from_row(self, row: dict[str, Any]) -> Example:
        return Example(id=row["id"], query=row["question"], answer=row["answer"], target=row["solution"],
                       options=tuple(row.get("options", ())), meta={"family": row["family"]})

    def answer_format(self, example: Example) -> str:
        """The answer format of the example's family ("text" for an example of no family)."""
        return FORMATS.get(example.meta.get("family"), "text")

    def extract(self, output: str) -> dict[str, str | None]:
        """The stated answer as text (no family known here); :meth:`grade` extracts in the family's format."""
        return answers.extract("text", output)

    def grade(self, output: str, example: Example) -> tuple[dict[str, str | None], dict[str, float]]:
        extracted = answers.extract(self.answer_format(example), output, example.options)
        return extracted, self.score(extracted, example)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        fmt = self.answer_format(example)
        return {f"exact_match_{kind}": float(answers.matches(fmt, extracted[kind], example.answer, example.options))
                for kind in ("strict", "flexible")}
