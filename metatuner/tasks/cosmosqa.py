"""Cosmos QA: commonsense reading comprehension with four answer options (Huang et al. 2019).

Rows have ``context``, ``question``, ``answer0``..``answer3`` and ``label`` (0-3). The query shows the
options as "A) ...".."D) ..." and the model replies with a letter; the harness also compares the four
option texts by likelihood (``choices``) and scores that with ``meta["label"]``.
"""

from __future__ import annotations

import re
from typing import Any

from metatuner.errors import MetatunerError
from metatuner.tasks.base import TASKS, Example, HubSource, Task

LETTERS = ("A", "B", "C", "D")
# the phrase in any case, the letter in capitals: "the answer is a dog" names no option
_ANSWER_IS_RE = re.compile(r"(?i:the answer is)\s*:?\s*(?i:option\s*)?\(?([A-D])\b")
_LETTER_RE = re.compile(r"\b([A-D])\b")


def _plain(text: str) -> str:
    """Lowercase with punctuation-free word spacing, for finding an option's text inside an output."""
    return " ".join(re.findall(r"\w+", text.lower()))


def extract_letter(output: str) -> dict[str, str | None]:
    """Strict: the letter in the last "The answer is X". Flexible: strict, else the first standalone
    capital A-D, else the whole stripped output, which ``chosen_letter`` matches against option texts."""
    stated = _ANSWER_IS_RE.findall(output)
    if stated:
        return {"strict": stated[-1], "flexible": stated[-1]}
    letter = _LETTER_RE.search(output)
    return {"strict": None, "flexible": letter.group(1) if letter else output.strip() or None}


def chosen_letter(answer: str | None, options: tuple[str, ...]) -> str | None:
    """The option an extracted answer names: the letter itself, else the letter of the longest option
    whose text occurs in the answer; None if it names none."""
    if answer is None or answer in LETTERS:
        return answer
    said = f" {_plain(answer)} "
    quoted = [(len(text), letter) for letter, text in zip(LETTERS, options) if f" {_plain(text)} " in said]
    return max(quoted)[1] if quoted else None


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
    field_types = {"id": (str, int), "label": (int, str)}
    primary_metric = "accuracy_flexible"
    # the hub repo is script-based; its parquet conversion loads with datasets >= 4
    hub = HubSource("allenai/cosmos_qa", splits={"train": "train", "test": "validation"},
                    revision="refs/convert/parquet")

    def example_from_row(self, row: dict[str, Any]) -> Example:
        options = tuple(row[f"answer{i}"] for i in range(len(LETTERS)))
        label = int(row["label"]) if str(row["label"]).strip() in ("0", "1", "2", "3") else None
        if label is None:
            raise MetatunerError(f"label must be 0, 1, 2 or 3, got {row['label']!r:.40}")
        listed = "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, options))
        return Example(
            id=row["id"],
            query=f"Context: {row['context']}\nQuestion: {row['question']}\nOptions:\n{listed}",
            answer=LETTERS[label],
            target=f"The answer is {LETTERS[label]}.",
            options=options,
            meta={"label": label},
        )

    def choices(self, example: Example) -> list[str]:
        return list(example.options)

    def extract(self, output: str) -> dict[str, str | None]:
        return extract_letter(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        flexible = chosen_letter(extracted["flexible"], example.options)
        return {
            "accuracy_strict": float(extracted["strict"] == example.answer),
            "accuracy_flexible": float(flexible == example.answer),
        }
