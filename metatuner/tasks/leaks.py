"""Does a generated prompt give the answer away?

G writes a per-query prompt (a rewrite of p~, or a hint appended to it). A prompt that states an answer
is not an instruction but a guess, and M copies it: wrong guesses cost accuracy, and under a
teacher-forced reward a right guess would win every rollout. Two checks, both pure functions of text:

- :func:`states_answer` needs no gold answer, so it guards every place a prompt is used (the task loss,
  evaluation, serving, export): the output states an answer in the task's strict format that p~ does
  not, says "the answer is/should be/: ..." with something other than what p~ says there (p~ states a
  *format*, "The answer is X"), states a number as the answer, or, on a task with lettered options,
  names one of the query's option letters ("Option B is correct.", "(C)", "choose D");
- :func:`leaks` adds the gold answer (rollouts know it): the output contains it as a word where neither
  the query nor p~ does.
"""

from __future__ import annotations

import functools
import re
import string

from metatuner.tasks.base import Example, Task

# "the answer (to this question) is 12", "answer: 12": an answer stated as a number
_STATES_NUMBER = re.compile(r"\banswer\b(?:\W+\w+){0,5}?(?:\W+is\b|\s*[:=])\W*-?\d", re.IGNORECASE)
# "the (final / correct) answer is / should be / would be / : <something>": what is said there, unless it
# describes a form ("should be a whole number", "is given in words", "must be short")
_STATES_PHRASE = re.compile(
    r"\banswer\s*(?:is|should\s+be|would\s+be|will\s+be|must\s+be|[:=])\s*['\"“]?\s*(?=[^\s'\"“])"
    r"(?!(?:a|an|in|one|given|written|expressed|stated|formatted|short|brief|concise|only|just|exactly|at|of|on)\b)"
    r"([^\n.!?'\"”]*)",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=None)
def _option_patterns(letters: str) -> re.Pattern:
    # the cue words in any case, the letter in capitals: "a good plan" names no option
    span = f"[{letters}]"
    return re.compile(
        rf"(?i:\b(?:option|choice|answer|letter|pick|choose|select|go\s+with)\b)\s*(?i:is\s+)?:?\s*\(?{span}\b"
        rf"|\({span}\)"
        rf"|\b{span}\)"
        rf"|\b{span}\b\s*(?i:is|seems|looks)\s+(?i:correct|right|best|true|the\s+answer)"
    )


def _said(text: str) -> set[str]:
    """What ``text`` says after each "answer is ..." (lowercased, spaces collapsed)."""
    return {" ".join(m.lower().split()) for m in _STATES_PHRASE.findall(text)}


def names_option(example: Example, output: str) -> bool:
    """Whether ``output`` names one of the query's option letters (only for queries with options)."""
    if not example.options:
        return False
    letters = string.ascii_uppercase[: len(example.options)]
    return _option_patterns(letters).search(output) is not None


def states_answer(task: Task, example: Example, output: str) -> bool:
    """Whether G's ``output`` states an answer (see the module docstring); no gold answer is needed."""
    if not output:
        return False
    initial = task.instruction_for(example)
    strict = task.extract(output)["strict"]
    if strict is not None and strict != task.extract(initial)["strict"]:
        return True
    if _STATES_NUMBER.search(output) and not _STATES_NUMBER.search(initial):
        return True
    if _said(output) - _said(initial) - {""}:
        return True
    return names_option(example, output)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def leaks(task: Task, example: Example, output: str) -> bool:
    """Whether G's ``output`` gives the answer away: it states one (:func:`states_answer`), or it contains
    the gold answer as a word where the query and p~ do not."""
    if not output:
        return False
    if states_answer(task, example, output):
        return True
    gold, initial = example.answer.strip(), task.instruction_for(example)
    return bool(gold) and _has_word(output, gold) and not _has_word(example.query, gold) and not _has_word(initial, gold)
