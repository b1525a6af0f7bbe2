"""HotpotQA, closed book: multi-hop questions answered from the model's own knowledge (Yang et al. 2018).

Rows have ``question``, ``answer`` and ``type`` (bridge / comparison); the supporting paragraphs are
not given to the model. Scoring is the official HotpotQA exact match and token F1 on normalised answers.
Strict extraction takes the text after "The answer is" up to the end of its sentence; flexible falls
back to a leading yes/no, else the first line.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from metatuner.tasks.base import TASKS, Example, HubSource, Task

_ANSWER_IS_RE = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)
# a full stop after a word of four or more letters or after a number, then a capital: a new sentence.
# Shorter words are mostly abbreviations inside an answer ("St. Louis", "Mr. Church", "Vol. 2")
_SENTENCE_END_RE = re.compile(r"(?:(?<=[^\W\d_]{4})|(?<=\d))\.\s+(?=[A-Z])")
# a reply that opens with yes or no answers a yes/no question, whatever explanation follows
_YES_NO_RE = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_CLOSED_ANSWERS = ("yes", "no", "noanswer")


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def exact_match(predicted: str | None, gold: str) -> float:
    """1.0 when the normalised answers are identical, else 0.0 (also for a missing answer)."""
    return float(predicted is not None and normalize_answer(predicted) == normalize_answer(gold))


def f1(predicted: str | None, gold: str) -> float:
    """Token-level F1 of normalised answers; yes/no/noanswer must match exactly (official HotpotQA rule)."""
    if predicted is None:
        return 0.0
    pred, ref = normalize_answer(predicted), normalize_answer(gold)
    if (pred in _CLOSED_ANSWERS or ref in _CLOSED_ANSWERS) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def after_last_answer_is(output: str) -> str | None:
    """The rest of the line after the last "The answer is" (any case); None if the phrase is absent."""
    matches = list(_ANSWER_IS_RE.finditer(output))
    return output[matches[-1].end() :].split("\n", 1)[0] if matches else None


def _clean(answer: str) -> str | None:
    answer = answer.strip().removesuffix(".").strip()
    return answer or None


@TASKS.register("hotpotqa")
class HotpotQA(Task):
    """Closed-book multi-hop QA; scored by exact match and token F1."""

    name = "hotpotqa"
    version = "2"  # 2: sentence ends after numbers; flexible takes a leading yes/no
    instruction = "Answer the question with a short phrase, in the form 'The answer is X.'"
    cot_instruction = (
        "Let's think step by step about what the question asks, "
        "then end with the short answer in the form 'The answer is X.'"
    )
    max_new_tokens = 32
    cot_max_new_tokens = 192
    required_fields = ("id", "question", "answer", "type")
    primary_metric = "f1_flexible"
    metric = "f1"
    hub = HubSource(
        "hotpotqa/hotpot_qa", configs=("distractor",), splits={"train": "train", "test": "validation"}
    )

    def hub_row(self, row: dict[str, Any], split: str, index: int) -> dict[str, Any]:
        # the local layout is closed book: the context paragraphs and supporting facts are dropped
        return {"id": row["id"], "question": row["question"], "answer": row["answer"], "type": row["type"]}

    def example_from_row(self, row: dict[str, Any]) -> Example:
        return Example(
            id=row["id"],
            query=row["question"],
            answer=row["answer"],
            target=f"The answer is {row['answer']}.",
            meta={"type": row["type"]},
        )

    def extract(self, output: str) -> dict[str, str | None]:
        return extract_phrase(output, yes_no=True)

    def score(self, extracted: dict[str, str | None], example: Example) -> dict[str, float]:
        return score_phrase(extracted, example.answer)


def extract_phrase(output: str, yes_no: bool = False) -> dict[str, str | None]:
    """Strict: the sentence after the last "The answer is". Flexible: strict, else (with ``yes_no``) a leading
    yes/no, else the first line."""
    stated = after_last_answer_is(output)
    strict = _clean(_SENTENCE_END_RE.split(stated, maxsplit=1)[0]) if stated is not None else None
    if strict is not None:
        return {"strict": strict, "flexible": strict}
    leading = _YES_NO_RE.match(output) if yes_no else None
    lines = [line for line in output.splitlines() if line.strip()]
    flexible = leading.group(1).lower() if leading else (_clean(lines[0]) if lines else None)
    return {"strict": None, "flexible": flexible}


def score_phrase(extracted: dict[str, str | None], gold: str) -> dict[str, float]:
    """Exact match and token F1 of the strict and the flexible answer against the gold phrase."""
    return {
        "exact_match_strict": exact_match(extracted["strict"], gold),
        "f1_strict": f1(extracted["strict"], gold),
        "exact_match_flexible": exact_match(extracted["flexible"], gold),
        "f1_flexible": f1(extracted["flexible"], gold),
    }
