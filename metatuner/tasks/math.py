"""MATH: competition mathematics with LaTeX answers (Hendrycks et al. 2021).

Rows have ``problem``, ``solution`` (final answer in ``\\boxed{...}``), ``level`` and ``type``. The gold
answer is the content of the solution's last ``\\boxed{}``; answers are compared for mathematical
equivalence with the ``math_verify`` library, so ``\\frac{1}{2}`` matches ``0.5`` and ``x=3`` matches ``3``.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from math_verify import parse, verify

from metatuner.errors import MetatunerError
from metatuner.tasks.base import TASKS, Example, HubSource, Task

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_IS_RE = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)
_INLINE_MATH_RE = re.compile(r"\$([^$]+)\$")
_MATH_VERIFY_TIMEOUT_S = 5


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced) or ``\\boxed x``."""
    start, command = max((text.rfind(command), command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start + len(command) :]
    if rest.startswith(" "):
        # "\boxed 5": the argument runs to the next space or "$"
        return re.split(r"[\s$]", rest.lstrip(), maxsplit=1)[0] or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None


def equivalent(gold: str, predicted: str | None) -> bool:
    """Whether a predicted LaTeX answer equals the gold one, as ``math_verify`` judges it.

    An empty answer matches nothing: two MATH training solutions end in an empty ``\\boxed{}``.
    """
    if predicted is None or not predicted.strip():
        return False
    if predicted.strip() == gold.strip():
        return True
    # math_verify's timeouts rely on SIGALRM, which only the main thread may set; elsewhere run untimed
    on_main = threading.current_thread() is threading.main_thread()
    timeout = _MATH_VERIFY_TIMEOUT_S if on_main else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if not (gold_parsed and predicted_parsed):
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=timeout)


@TASKS.register("math")
class Math(Task):
    """Competition math; scored by math_verify equivalence of the final answer."""

    name = "math"
    instruction = "Solve the problem and put your final answer in \\boxed{}."
    cot_instruction = (
        "Let's think step by step. Solve the problem, showing your reasoning, "
        "and put your final answer in \\boxed{}."
    )
    max_new_tokens = 384
    cot_max_new_tokens = 512
    required_fields = ("id", "problem", "solution", "level", "type")
    query_fields = ("problem",)
    template = "{problem}"
    answer_field = "solution"
    metric = "math"
    primary_metric = "accuracy_flexible"
    hub = HubSource(
        "EleutherAI/hendrycks_math",
        configs=(
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ),
    )

    def hub_row(self, row: dict[str, Any], split: str, index: int) -> dict[str, Any]:
        # indices restart in every config, so the subject keeps ids unique (as in the local files)
        subject = row["type"].lower().replace(" & ", "_and_").replace(" ", "_")
        return {"id": f"math-{split}-{subject}-{index}", **row}

    def example_from_row(self, row: dict[str, Any]) -> Example:
        answer = last_boxed(row["solution"])
        if answer is None:
            raise MetatunerError(f"math row {row['id']!r}: the solution has no \\boxed{{}} final answer")
        return Example(
            id=row["id"],
            query=row["problem"],
            answer=answer,
            target=row["solution"],
            meta={"level": row["level"], "type": row["type"]},
        )

    def extract(self, output: str) -> dict[str, str | None]:
        return extract_math(output)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return score_math(extracted, example.answer)


def extract_math(output: str) -> dict[str, str | None]:
    """Strict: the last ``\\boxed{}``. Flexible: strict, else the answer after "The answer is", else the last
    ``$...$`` span."""
    strict = last_boxed(output)
    return {"strict": strict, "flexible": strict if strict is not None else _loose_answer(output)}


def score_math(extracted: dict[str, str | None], gold: str) -> dict[str, float]:
    """math_verify equivalence of the strict and the flexible answer with the gold one."""
    return {
        "accuracy_strict": float(equivalent(gold, extracted["strict"])),
        "accuracy_flexible": float(equivalent(gold, extracted["flexible"])),
    }


def _loose_answer(output: str) -> str | None:
    """The answer after the last "The answer is", else the last ``$...$`` span; None if neither."""
    stated = list(_ANSWER_IS_RE.finditer(output))
    if stated:
        line = output[stated[-1].end() :].split("\n", 1)[0]
        return line.strip().removesuffix(".").strip().strip("$").strip() or None
    spans = _INLINE_MATH_RE.findall(output)
    return spans[-1].strip() if spans else None
