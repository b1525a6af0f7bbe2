"""GSM8K: grade-school math word problems with a single numeric answer (Cobbe et al. 2021).

Rows have ``question`` and ``answer``; the latter is a worked solution with ``<<48/2=24>>`` calculator
notes, ending in a line ``#### N``. The fine-tuning target is that solution without the notes and with
the last line rewritten as "The answer is N.", the format the instruction asks for.
"""

from __future__ import annotations

import re
from typing import Any

from metatuner.errors import MetatunerError
from metatuner.tasks.base import TASKS, Example, HubSource, Task
from metatuner.tasks.numeric import COT_INSTRUCTION, INSTRUCTION, extract_numeric, score_numeric

_CALCULATOR_NOTE_RE = re.compile(r"<<[^>]*>>")


def split_solution(solution: str) -> tuple[str, str]:
    """Splits a GSM8K solution into its reasoning (calculator notes removed) and the final number."""
    reasoning, _, final = solution.rpartition("####")
    return _CALCULATOR_NOTE_RE.sub("", reasoning).strip(), final.strip().replace(",", "")


@TASKS.register("gsm8k")
class GSM8K(Task):
    """Grade-school math; scored by exact numeric match of the final answer."""

    name = "gsm8k"
    instruction = INSTRUCTION
    cot_instruction = COT_INSTRUCTION
    max_new_tokens = 192
    cot_max_new_tokens = 256
    required_fields = ("id", "question", "answer")
    primary_metric = "exact_match_flexible"
    metric = "numeric"
    hub = HubSource("openai/gsm8k", configs=("main",))

    def example_from_row(self, row: dict[str, Any]) -> Example:
        if "####" not in row["answer"]:
            raise MetatunerError(f"gsm8k row {row['id']!r}: the answer has no '#### N' final line")
        reasoning, answer = split_solution(row["answer"])
        return Example(
            id=row["id"],
            query=row["question"],
            answer=answer,
            target=f"{reasoning}\nThe answer is {answer}.",
        )

    def extract(self, output: str) -> dict[str, str | None]:
        return extract_numeric(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return score_numeric(extracted, example.answer)
