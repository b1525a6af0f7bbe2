"""Answer formats of the mixture task: a number, a list of numbers, a weekday, an option letter, or text.

Every format reads the answer stated in "The answer is X" (*strict*) and, failing that, falls back to a
looser rule (*flexible*), and writes what it found in one canonical form, so that an answer scores by
plain equality with the gold one, which is stored in the same form:

| format | canonical form | flexible fallback |
|---|---|---|
| ``number`` | "300" (numeric equality: "300.0" == "300") | the last number in the output |
| ``numbers`` | "3, 7, 12" (order kept) | the numbers of the output's last line that has one |
| ``weekday`` | "Thursday" (any case in the output) | the last weekday named in the output |
| ``letter`` | "B" | the first standalone A-D, else the option whose text the output names |
| ``text`` | the stated text, trimmed | the output's last non-empty line |

Extraction and normalisation are pure functions of strings, tested on hand-written outputs.
"""

from __future__ import annotations

import re

from metatuner.tasks.cosmosqa import chosen_letter, extract_letter
from metatuner.tasks.numeric import extract_numeric, format_number, numbers_equal, parse_number

FORMATS = ("number", "numbers", "weekday", "letter", "text")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_STATED_RE = re.compile(r"the answer is\s*:?\s*([^\n]*)", re.IGNORECASE)
_TRIM_RE = re.compile(r"^[\s*\"'`]+|[\s*\"'`.]+$")  # around a stated answer: quotes, bold marks, full stop
_INTEGER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_WEEKDAY_RE = re.compile(r"\b(" + "|".join(WEEKDAYS) + r")\b", re.IGNORECASE)
_LEADING_LETTER_RE = re.compile(r"^\(?([A-D])\b")


def stated(output: str) -> str | None:
    """The text after the last "The answer is" up to the end of its line, trimmed of a final full stop,
    quotes and bold marks; None when the output states no answer."""
    found = _STATED_RE.findall(output)
    if not found:
        return None
    return _TRIM_RE.sub("", found[-1]) or None


def normalise(fmt: str, text: str | None, options: tuple[str, ...] = ()) -> str | None:
    """``text`` in ``fmt``'s canonical form; None when it holds no answer of that format."""
    if text is None:
        return None
    if fmt == "number":
        numbers = _INTEGER_RE.findall(text.replace(",", ""))
        return format_number(parse_number(numbers[0])) if numbers else None
    if fmt == "numbers":
        numbers = _INTEGER_RE.findall(text)
        return ", ".join(format_number(parse_number(n)) for n in numbers) or None
    if fmt == "weekday":
        day = _WEEKDAY_RE.search(text)
        return day.group(1).capitalize() if day else None
    if fmt == "letter":
        lead = _LEADING_LETTER_RE.match(text.strip())
        return lead.group(1) if lead else chosen_letter(text.strip(), options)
    return " ".join(text.split()).rstrip(".") or None


def extract(fmt: str, output: str, options: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Strict and flexible answers of ``output`` in ``fmt``'s canonical form."""
    if fmt == "number":
        return extract_numeric(output)
    if fmt == "letter":
        found = extract_letter(output)
        return {"strict": found["strict"], "flexible": normalise("letter", found["flexible"], options)}
    strict = normalise(fmt, stated(output), options)
    if strict is not None:
        return {"strict": strict, "flexible": strict}
    if fmt == "numbers":
        lines = [line for line in output.splitlines() if _INTEGER_RE.search(line)]
        fallback = lines[-1] if lines else None
    elif fmt == "weekday":
        days = _WEEKDAY_RE.findall(output)
        fallback = days[-1] if days else None
    else:
        lines = [line for line in output.splitlines() if line.strip()]
        fallback = lines[-1] if lines else None
    return {"strict": None, "flexible": normalise(fmt, fallback, options)}


def matches(fmt: str, answer: str | None, gold: str, options: tuple[str, ...] = ()) -> bool:
    """Whether an answer (canonical or not) equals the gold one in ``fmt``."""
    if fmt == "number":
        return numbers_equal(normalise("number", answer), gold)
    found = normalise(fmt, answer, options)
    if fmt == "text":
        return found is not None and found.lower() == normalise("text", gold).lower()
    return found is not None and found == gold
