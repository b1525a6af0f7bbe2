"""Answer metrics by name: how an answer is pulled out of an output and scored, for task spec files.

Each metric pairs the extraction and scoring functions of a built-in task, so a task written as a spec
file grades exactly like the built-in task with the same metric:

| metric    | extraction (strict / flexible)                          | scores (primary first)               | as in      |
|-----------|---------------------------------------------------------|--------------------------------------|------------|
| `numeric` | "The answer is N" / the last number                     | exact_match_flexible, _strict        | gsm8k      |
| `exact`   | the sentence after "The answer is" / the first line     | exact_match_flexible, _strict        | hotpotqa   |
| `f1`      | as `exact`, and a leading yes/no                        | f1_flexible, exact_match_*, f1_strict | hotpotqa   |
| `letter`  | "The answer is X" / the first option letter or text     | accuracy_flexible, accuracy_strict   | cosmosqa   |
| `math`    | the last `\\boxed{}` / "The answer is", last `$...$`     | accuracy_flexible, accuracy_strict   | math       |
| `regex`   | the first group of the last match of ``pattern`` / the first line | exact_match_flexible, _strict | -  |
| `module:function` | the whole output                                | ``score`` (or the names it returns)  | -          |

A ``module:function`` metric is called as ``function(output, answer)`` and returns a number in [0, 1] or a
dict of them; its ``primary`` names the one reported first.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

from metatuner.errors import MetatunerError
from metatuner.tasks.base import Example
from metatuner.tasks.cosmosqa import extract_letter, score_letter
from metatuner.tasks.hotpotqa import exact_match, extract_phrase, score_phrase
from metatuner.tasks.math import extract_math, score_math
from metatuner.tasks.numeric import INSTRUCTION as NUMERIC_INSTRUCTION
from metatuner.tasks.numeric import extract_numeric, numbers_equal, score_numeric

Extracted = dict[str, str | None]

PHRASE_INSTRUCTION = "Answer the question with a short phrase, in the form 'The answer is X.'"
LETTER_INSTRUCTION = "Choose the best option. Reply with 'The answer is X', where X is the option's letter."
MATH_INSTRUCTION = "Solve the problem and put your final answer in \\boxed{}."
ANSWER_IS = "The answer is {answer}."


@dataclass(frozen=True)
class Metric:
    """One way to grade answers: ``extract(output, letters)`` and ``score(extracted, example, letters)``."""

    name: str
    primary: str
    extract: Callable[[str, tuple[str, ...]], Extracted]
    score: Callable[[Extracted, Example, tuple[str, ...]], dict[str, float]]
    #: the initial instruction p~ of a spec that gives none (None: the spec must give one)
    instruction: str | None = None
    #: the fine-tuning target of a row that has no target field, from its gold answer
    target_format: str = ANSWER_IS


BUILT_IN: dict[str, Metric] = {
    m.name: m for m in (
        Metric("numeric", "exact_match_flexible", lambda o, _: extract_numeric(o),
               lambda e, ex, _: score_numeric(e, ex.answer), NUMERIC_INSTRUCTION),
        Metric("exact", "exact_match_flexible", lambda o, _: extract_phrase(o),
               lambda e, ex, _: {k: v for k, v in score_phrase(e, ex.answer).items() if k.startswith("exact")},
               PHRASE_INSTRUCTION),
        Metric("f1", "f1_flexible", lambda o, _: extract_phrase(o, yes_no=True), lambda e, ex, _: score_phrase(e, ex.answer),
               PHRASE_INSTRUCTION),
        Metric("letter", "accuracy_flexible", lambda o, letters: extract_letter(o, letters),
               lambda e, ex, letters: score_letter(e, ex.answer, ex.options, letters), LETTER_INSTRUCTION),
        Metric("math", "accuracy_flexible", lambda o, _: extract_math(o), lambda e, ex, _: score_math(e, ex.answer),
               MATH_INSTRUCTION, target_format="The answer is $\\boxed{{{answer}}}$."),
    )
}
NAMES = (*BUILT_IN, "regex", "module:function")


def regex_metric(pattern: str) -> Metric:
    """Extraction by a regular expression: the first group (else the whole match) of its last match."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise MetatunerError(f"metric.pattern {pattern!r} is not a regular expression ({e})") from None
    if compiled.groups > 1:
        raise MetatunerError(f"metric.pattern {pattern!r} has {compiled.groups} groups; give at most one")

    def extract(output: str, _letters) -> Extracted:
        matches = list(compiled.finditer(output))
        strict = matches[-1].group(compiled.groups).strip() if matches else None
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        return {"strict": strict, "flexible": strict if strict is not None else (lines[0] if lines else None)}

    def score(extracted: Extracted, example: Example, _letters) -> dict[str, float]:
        def same(answer: str | None) -> float:  # equal as phrases, or as numbers
            return float(bool(exact_match(answer, example.answer)) or numbers_equal(answer, example.answer))

        return {"exact_match_strict": same(extracted["strict"]), "exact_match_flexible": same(extracted["flexible"])}

    return Metric("regex", "exact_match_flexible", extract, score, target_format="{answer}")


def callable_metric(spec: str, primary: str | None) -> Metric:
    """A user's ``module:function``, called as ``function(output, answer)`` -> a number or a dict of them."""
    module_name, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise MetatunerError(f"metric {spec!r} could not be imported ({type(e).__name__}: {e})") from None
    if not callable(function):
        raise MetatunerError(f"metric {spec!r} is not callable")
    return function_metric(function, spec, primary)


def function_metric(function: Callable[[str, str], float | dict[str, float]], name: str,
                    primary: str | None = None) -> Metric:
    """A metric from a Python function, called as ``function(output, answer)`` on the whole (stripped) output
    and the gold answer; it returns a number in [0, 1] or a dict of them, of which ``primary`` (default
    ``score``) is reported first."""
    primary = primary or "score"

    def score(extracted: Extracted, example: Example, _letters) -> dict[str, float]:
        value = function(extracted["flexible"] or "", example.answer)
        scores = dict(value) if isinstance(value, dict) else {"score": value}
        if primary not in scores:
            raise MetatunerError(f"metric {name!r} returned {sorted(scores)}, without its primary {primary!r}")
        return {k: float(v) for k, v in scores.items()}

    return Metric(name, primary, lambda o, _: {"strict": o.strip(), "flexible": o.strip()}, score,
                  target_format="{answer}")


def get_metric(name: str, pattern: str | None = None, primary: str | None = None) -> Metric:
    """The metric called ``name``: a built-in one, ``regex`` (with ``pattern``) or ``module:function``."""
    if name == "regex":
        if not pattern:
            raise MetatunerError("metric regex needs metric.pattern, e.g. 'Answer: (.+)'")
        return regex_metric(pattern)
    if pattern:
        raise MetatunerError(f"metric.pattern is only used by metric regex, not {name!r}")
    if ":" in name:
        return callable_metric(name, primary)
    if name not in BUILT_IN:
        raise MetatunerError(f"unknown metric {name!r}; available: {', '.join(NAMES)}")
    return BUILT_IN[name]
