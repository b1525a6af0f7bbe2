"""Cosmos QA: commonsense reading comprehension with four answer options (Huang et al. 2019).

Rows have ``context``, ``question``, ``answer0``..``answer3`` and ``label`` (0-3). The query shows the
options as "A) ...".."D) ..." and the model replies with a letter; the harness also compares the four
option texts by likelihood (``choices``) and scores that with ``meta["label"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

from metatuner.errors import MetatunerError
from metatuner.tasks.base import TASKS, Example, HubSource, Task

LETTERS = ("A", "B", "C", "D")


@functools.lru_cache(maxsize=None)
def _letter_patterns(letters: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    # the phrase in any case, the letter in capitals: "the answer is a dog" names no option
    span = "".join(letters)
    return (re.compile(rf"(?i:the answer is)\s*:?\s*(?i:option\s*)?\(?([{span}])\b"),
            re.compile(rf"\b([{span}])\b"))


def _plain(text: str) -> str:
    """Lowercase with punctuation-free word spacing, for finding an option's text inside an output."""
    return " ".join(re.findall(r"\w+", text.lower()))


def list_options(options: tuple[str, ...], letters: tuple[str, ...] = LETTERS) -> str:
    """The options as the query shows them: one "A) text" line each."""
    return "\n".join(f"{letter}) {text}" for letter, text in zip(letters, options))


def extract_letter(output: str, letters: tuple[str, ...] = LETTERS) -> dict[str, str | None]:
    """Strict: the letter in the last "The answer is X". Flexible: strict, else the first standalone
    capital among ``letters``, else the whole stripped output, which ``chosen_letter`` matches against
    option texts."""
    answer_is, standalone = _letter_patterns(tuple(letters))
    stated = answer_is.findall(output)
    if stated:
        return {"strict": stated[-1], "flexible": stated[-1]}
    letter = standalone.search(output)
    return {"strict": None, "flexible": letter.group(1) if letter else output.strip() or None}


def chosen_letter(answer: str | None, options: tuple[str, ...], letters: tuple[str, ...] = LETTERS) -> str | None:
    """The option an extracted answer names: the letter itself, else the letter of the longest option
    whose text occurs in the answer; None if it names none."""
    if answer is None or answer in letters:
        return answer
    said = f" {_plain(answer)} "
    quoted = [(len(text), letter) for letter, text in zip(letters, options) if f" {_plain(text)} " in said]
    return max(quoted)[1] if quoted else None


def score_letter(extracted: dict[str, str | None], gold: str, options: tuple[str, ...],
                 letters: tuple[str, ...] = LETTERS) -> dict[str, float]:
    """Accuracy of the strict letter and of the flexible answer (a letter or an option's text)."""
    return {
        "accuracy_strict": float(extracted["strict"] == gold),
        "accuracy_flexible": float(chosen_letter(extracted["flexible"], options, letters) == gold),
    }


@TASKS.register("cosmosqa")
class CosmosQA(Task):
    """Four-way multiple choice; scored by accuracy of the chosen letter."""

    name = "cosmosqa"
    instruction = (
        "Read the context and choose the best answer to the question. "
        "Reply with 'The answer is X', where X is A, B, C or D."
    )
    cot_instruction = (
        "Read the context, then let's think step by step about which option best answers the question. "
        "End with 'The answer is X', where X is A, B, C or D."
    )
    max_new_tokens = 16
    cot_max_new_tokens = 192
    required_fields = ("id", "context", "question", "answer0", "answer1", "answer2", "answer3", "label")
    query_fields = ("context", "question", "answer0", "answer1", "answer2", "answer3")
    field_types = {"id": (str, int), "label": (int, str)}
    primary_metric = "accuracy_flexible"
    template = "Context: {context}\nQuestion: {question}"
    answer_field = "label"
    metric = "letter"
    # the hub repo is script-based; its parquet conversion loads with datasets >= 4
    hub = HubSource("allenai/cosmos_qa", splits={"train": "train", "test": "validation"},
                    revision="refs/convert/parquet")

    def example_from_row(self, row: dict[str, Any]) -> Example:
        label = int(row["label"]) if str(row["label"]).strip() in ("0", "1", "2", "3") else None
        if label is None:
            raise MetatunerError(f"label must be 0, 1, 2 or 3, got {row['label']!r:.40}")
        return dataclasses.replace(self.unlabelled_example(row), id=row["id"], answer=LETTERS[label],
                                   target=f"The answer is {LETTERS[label]}.", meta={"label": label})

    def unlabelled_example(self, row: dict[str, Any]) -> Example:
        options = tuple(row[f"answer{i}"] for i in range(len(LETTERS)))
        return Example(
            id=str(row["id"]),
            query=f"Context: {row['context']}\nQuestion: {row['question']}\nOptions:\n{list_options(options)}",
            answer="", target="", options=options,
        )

    def card(self) -> dict[str, Any]:
        return {**super().card(), "options": [f"answer{i}" for i in range(len(LETTERS))]}

    def choices(self, example: Example) -> list[str]:
        return list(example.options)

    def extract(self, output: str) -> dict[str, str | None]:
        return extract_letter(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return score_letter(extracted, example.answer, example.options)
