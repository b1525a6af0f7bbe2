"""Numeric final answers: parsing number strings, finding them in model outputs, and scoring them.

Shared by every task whose answer is a single number (GSM8K and the built-in arithmetic task). The
instruction asks the model to end with "The answer is N"; strict extraction accepts only that phrase,
flexible extraction falls back to the last number in the output. Numbers compare exactly as decimals,
so "1,234" == "1234", "$5.00" == "5" and "12.50" == "12.5".
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

INSTRUCTION = "Solve the problem step by step and end with 'The answer is N', where N is the final number."
COT_INSTRUCTION = (
    "Let's think step by step. Work through the problem one calculation at a time, "
    "then end with 'The answer is N', where N is the final number."
)

# a thousands-separated number ("1,234,567.5") or a plain one ("-12", "$3.25"). A trailing "." is
# left out so that the full stop ending a sentence is not part of the number, and a "-" right after a
# word or a bracket is a subtraction ("12-3"), not a sign
_NUMBER = r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"the answer is\s*:?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)


def parse_number(text: str) -> Decimal | None:
    """Parses a number string such as "1,234", "$5.00", "-3", "14." or "12.50"; None if it is not one."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def format_number(value: Decimal) -> str:
    """Writes a number in its shortest plain form: "5" for 5.00, "12.5" for 12.50, "1234" for 1,234."""
    text = format(value.normalize(), "f")
    return "0" if text == "-0" else text


def extract_answer_is(text: str) -> str | None:
    """The number in the last "The answer is N" phrase (any case), normalised; None if there is none."""
    matches = _ANSWER_IS_RE.findall(text)
    return _normalised(matches[-1]) if matches else None


def last_number(text: str) -> str | None:
    """The last number written anywhere in the text, normalised; None if there is none."""
    matches = _NUMBER_RE.findall(text)
    return _normalised(matches[-1]) if matches else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two number strings denote the same value; False when either is missing or not a number."""
    x = parse_number(a) if a is not None else None
    y = parse_number(b) if b is not None else None
    return x is not None and y is not None and x == y


def extract_numeric(output: str) -> dict[str, str | None]:
    """Strict ("The answer is N") and flexible (strict, else the last number) answers of an output."""
    strict = extract_answer_is(output)
    return {"strict": strict, "flexible": strict if strict is not None else last_number(output)}


def score_numeric(extracted: dict[str, str | None], gold: str) -> dict[str, float]:
    """Exact numeric match of the strict and the flexible answer against the gold number."""
    return {
        "exact_match_strict": float(numbers_equal(extracted["strict"], gold)),
        "exact_match_flexible": float(numbers_equal(extracted["flexible"], gold)),
    }


def _normalised(match: str) -> str:
    # every match of _NUMBER parses, so the value is never None here
    return format_number(parse_number(match))
