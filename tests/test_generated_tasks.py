"""The generated built-in tasks: the mixture's families and answer formats, and the template-shift split
of ``arithmetic`` and ``mixture`` (no frame, name or object of it occurs in train; same difficulty)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from metatuner.errors import MetatunerError
from metatuner.tasks import Example, get_task
from metatuner.tasks import answers, arithmetic, mixture


def _frames(vocab) -> list[str]:
    """Every sentence frame of a split's vocabulary (arithmetic's or the mixture's)."""
    if isinstance(vocab, arithmetic.Vocabulary):
        return list(vocab.frames)
    return [*vocab.word_problems.frames, *vocab.letter_frames, *(f for f, _ in vocab.sorting_frames),
            *vocab.unit_frames, *(f for f, _ in vocab.weekday_frames), *vocab.choice_frames]


def _objects(vocab) -> list[str]:
    """The names and objects of a vocabulary: what a problem is about, beside its frame."""
    if isinstance(vocab, arithmetic.Vocabulary):
        return [n for n, _ in vocab.names] + list(vocab.things)
    return _objects(vocab.word_problems) + list(vocab.words) + [i for items in vocab.items for i in items]


def _pattern(frame: str) -> re.Pattern:
    """A frame as a regex: its literal text, each slot any text."""
    parts = re.split(r"\{\w+\}", frame)
    return re.compile(".+?".join(re.escape(p) for p in parts))


def _sentence(query: str) -> str:
    return query.split("\n")[0]  # a choice question's options follow on their own lines


@pytest.fixture(scope="module", params=["arithmetic", "mixture"])
def splits(request):
    task = get_task(request.param)
    module = arithmetic if request.param == "arithmetic" else mixture
    return module, {s: task.load(s) for s in ("train", "test", "test_shift")}


def test_every_question_comes_from_its_splits_frames(splits):
    module, data = splits
    for split, examples in data.items():
        patterns = [_pattern(f) for f in _frames(module.VOCABULARY[split])]
        unmatched = [e.query for e in examples if not any(p.fullmatch(_sentence(e.query)) for p in patterns)]
        assert not unmatched, f"{split}: {unmatched[:3]}"


def test_no_frame_name_or_object_of_the_shift_split_occurs_in_train(splits):
    module, data = splits
    train = [_sentence(e.query) for e in data["train"]]
    shifted, ordinary = module.VOCABULARY["test_shift"], module.VOCABULARY["train"]
    for frame in _frames(shifted):
        assert frame not in _frames(ordinary)
        pattern = _pattern(frame)
        assert not any(pattern.fullmatch(q) for q in train), frame
    text = "\n".join(e.query for e in data["train"])
    for word in _objects(shifted):
        assert not re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE), word
    shift_text = "\n".join(e.query for e in data["test_shift"])
    used = [w for w in _objects(shifted) if re.search(rf"\b{re.escape(w)}\b", shift_text)]
    assert len(used) >= 0.9 * len(_objects(shifted))  # the shift split does use its own vocabulary


def test_the_shift_split_has_the_difficulty_of_train(splits):
    """Same operations and steps in the same shares, same number ranges, same answer formats."""
    _, data = splits

    def profile(examples):
        steps = Counter(e.target.count(" = ") for e in examples)
        return {k: v / len(examples) for k, v in steps.items()}

    train, shift = profile(data["train"]), profile(data["test_shift"])
    assert set(train) == set(shift) and all(abs(train[k] - shift[k]) < 0.05 for k in train)
    for q in (0.5, 0.95):  # the numbers in the questions: same median and tail
        quantile = lambda examples: sorted(int(n) for e in examples for n in re.findall(r"\d+", e.query))[  # noqa: E731
            int(q * sum(len(re.findall(r"\d+", e.query)) for e in examples))]
        assert abs(quantile(data["test_shift"]) - quantile(data["train"])) <= 0.1 * quantile(data["train"]) + 1
    families = lambda examples: Counter(e.meta.get("family") for e in examples)  # noqa: E731
    assert families(data["test_shift"]).keys() == families(data["train"]).keys()


def test_splits_are_sized_distinct_deterministic_and_test_is_unseen(splits):
    module, data = splits
    task = get_task(module.__name__.rsplit(".", 1)[1])
    assert {s: len(v) for s, v in data.items()} == {"train": 2000, "test": 500, "test_shift": 500}
    for examples in data.values():
        assert len({e.query for e in examples}) == len(examples)
    assert not {e.query for e in data["train"]} & {e.query for e in data["test"]}
    assert task.load("test_shift") == data["test_shift"]
    assert data["test_shift"][3].id == f"{task.name}-test_shift-3"


def test_every_target_scores_full_marks_and_a_wrong_answer_none(splits):
    module, data = splits
    task = get_task(module.__name__.rsplit(".", 1)[1])
    for split, examples in data.items():
        for ex in examples:
            assert ex.target.endswith(f"The answer is {ex.answer}."), ex
            assert task.grade(ex.target, ex)[1] == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
            assert task.grade("The answer is 999.", ex)[1]["exact_match_flexible"] == 0.0


def test_an_unknown_split_lists_the_tasks_splits():
    with pytest.raises(MetatunerError, match="unknown split 'dev' of task 'mixture'; available: train, test, "
                                             "test_shift"):
        get_task("mixture").load("dev")
    with pytest.raises(MetatunerError, match="unknown split 'test_shift' of task 'gsm8k'; available: train, test"):
        get_task("gsm8k").load("test_shift")


# ---- the mixture ------------------------------------------------------------------------------


def test_mixture_has_six_families_in_turn_under_one_instruction():
    task = get_task("mixture")
    examples = task.load("test")
    assert [e.meta["family"] for e in examples[:12]] == list(mixture.FAMILIES) * 2
    assert len(mixture.FAMILIES) >= 6 and len(set(mixture.FORMATS.values())) >= 4
    assert {task.instruction_for(e) for e in examples} == {mixture.INSTRUCTION}
    counts = Counter(e.meta["family"] for e in task.load("train"))
    assert min(counts.values()) >= 2000 // len(mixture.FAMILIES)


def test_mixture_items_are_right():
    """Each family's gold answer checked against the question by an independent reading."""
    weekdays = list(answers.WEEKDAYS)
    for ex in get_task("mixture").load("train"):
        q, family = ex.query, ex.meta["family"]
        if family == "letters":
            letter, word = re.search(r"'(\w)'", q).group(1), re.findall(r"'(\w{3,})'", q)[0]
            assert ex.answer == str(word.count(letter))
        elif family == "sorting":
            nums = [int(n) for n in re.findall(r"\d+", q)]
            ascending = "smallest to largest" in q
            assert ex.answer == ", ".join(map(str, sorted(nums, reverse=not ascending)))
        elif family == "weekdays":
            day = re.search("|".join(weekdays), q).group(0)
            n = int(re.search(r"(\d+) days?", q).group(1))
            sign = -1 if "ago" in q or "earlier" in q else 1
            assert ex.answer == weekdays[(weekdays.index(day) + sign * n) % 7], q
        elif family == "choice":
            assert len(ex.options) == 4 and ex.answer in "ABCD"
            picked = ex.options["ABCD".index(ex.answer)]
            category = next(k for k, c in enumerate(mixture.CATEGORIES) if c in q)
            assert picked in mixture.ORDINARY_MIX.items[category]
            assert sum(o in mixture.ORDINARY_MIX.items[category] for o in ex.options) == 1


@pytest.mark.parametrize("family, output, strict, flexible", [
    ("letters", "banana has 3 a's. The answer is 3.", 1, 1),
    ("letters", "I count 3", 0, 1),
    ("sorting", "The answer is 3, 7, 12.", 1, 1),
    ("sorting", "The answer is 3, 12, 7.", 0, 0),  # order matters
    ("sorting", "Sorted:\n3, 7, 12", 0, 1),
    ("weekdays", "Monday + 3 days = Thursday. The answer is thursday.", 1, 1),
    ("weekdays", "It will be Thursday", 0, 1),
    ("weekdays", "The answer is Friday. Monday + 3 days = Thursday", 0, 0),
    ("choice", "The answer is B.", 1, 1),
    ("choice", "The answer is (B) pear", 1, 1),
    ("choice", "B", 0, 1),
    ("choice", "It must be the pear", 0, 1),
    ("units", "The answer is 3,000 grams.", 1, 1),
])
def test_mixture_grades_each_family_in_its_format(family, output, strict, flexible):
    gold = {"letters": "3", "sorting": "3, 7, 12", "weekdays": "Thursday", "choice": "B", "units": "3000"}[family]
    ex = Example(id="x", query="q", answer=gold, target="t", options=("dog", "pear", "car", "saw"),
                 meta={"family": family})
    scores = get_task("mixture").grade(output, ex)[1]
    assert scores == {"exact_match_strict": float(strict), "exact_match_flexible": float(flexible)}


def test_answer_formats_normalise_to_one_canonical_form():
    assert answers.stated("so... The answer is **3, 7, 12**.\n") == "3, 7, 12"
    assert answers.stated("no phrase") is None
    assert answers.normalise("number", "12.0 apples") == "12"
    assert answers.normalise("numbers", "[3, 7,12]") == "3, 7, 12"
    assert answers.normalise("weekday", "it is SUNDAY") == "Sunday"
    assert answers.normalise("letter", "C) car", ("dog", "pear", "car", "saw")) == "C"
    assert answers.normalise("letter", "the saw", ("dog", "pear", "car", "saw")) == "D"
    assert answers.normalise("weekday", "tomorrow") is None
    assert answers.extract("text", "line one\nThe answer is Blue.") == {"strict": "Blue", "flexible": "Blue"}


def test_a_cross_task_mix_has_its_test_tasks_splits():
    mix = get_task("mixture>arithmetic")
    assert mix.splits == ("train", "test", "test_shift")
    shifted = mix.load("test_shift")
    assert [e.query for e in shifted] == [e.query for e in get_task("arithmetic").load("test_shift")]
    assert {e.meta["task"] for e in shifted} == {"arithmetic"} and {e.meta["family"] for e in mix.load("train")} \
        == set(mixture.FAMILIES)


@pytest.mark.parametrize("held_out", ["weekdays", "sorting"])
def test_a_held_out_family_never_reaches_train_or_validation(held_out):
    from metatuner.recipes import train_val_split

    task = get_task(f"mixture-without-{held_out}>mixture-only-{held_out}")
    train, val = train_val_split(task.load("train"), 800, 32, seed=0)
    seen = {ex.meta["family"] for ex in train + val}
    assert seen == set(mixture.FAMILIES) - {held_out} and len(train) == 800 and len(val) == 32
    for split in ("test", "test_shift", "test_extra"):
        whole = [ex.id for ex in get_task("mixture").load(split) if ex.meta["family"] == held_out]
        tested = task.load(split)
        assert {ex.meta["family"] for ex in tested} == {held_out}
        assert [ex.id for ex in tested] == whole  # every item of the family in the whole mixture, and only those
    assert task.instruction == mixture.INSTRUCTION  # one p~ on both sides


def test_mixture_names_that_cut_its_families_are_checked():
    assert get_task("mixture").card()["metric"] == "per-family"  # `metatuner tasks mixture` printed a traceback
    # generated, not read from files: the card says so, and names the families a cut keeps
    assert get_task("mixture-only-weekdays,choice").card()["data"] == "built in: generated, families weekdays, choice; no files"
    assert get_task("mixture-only-weekdays,choice").families == ("weekdays", "choice")
    assert get_task("mixture-without-weekdays,choice").families == ("arithmetic", "letters", "sorting", "units")
    for bad, said in [("mixture-only-moon", "unknown family 'moon'"), ("mixture-except-weekdays", "bad mixture name"),
                      ("mixture-without-" + ",".join(mixture.FAMILIES), "leaves no family")]:
        with pytest.raises(MetatunerError, match=said):
            get_task(bad)


def test_mixture_test_extra_holds_300_unseen_items_of_each_family():
    task = get_task("mixture")
    extra = task.load("test_extra")
    assert Counter(ex.meta["family"] for ex in extra) == {f: 300 for f in mixture.FAMILIES}
    seen = {ex.query for split in ("train", "test") for ex in task.load(split)}
    assert len({ex.query for ex in extra}) == 1800 and not seen & {ex.query for ex in extra}
    assert extra[0].id == "mixture-test_extra-0" and task.load("test_extra") == extra  # deterministic
    assert len(get_task("mixture-without-sorting>mixture-only-sorting").load("test_extra")) == 300
