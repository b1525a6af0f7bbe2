"""Tasks: answer extraction and metrics on hand-written outputs, loading the local data, bad input."""

from __future__ import annotations

import json
import threading

import pytest

from metatuner.errors import MetatunerError
from metatuner.tasks import TASKS, Example, get_task
from metatuner.tasks.arithmetic import generate
from metatuner.tasks.cosmosqa import LETTERS
from metatuner.tasks.hotpotqa import exact_match, f1, normalize_answer
from metatuner.tasks.math import equivalent, last_boxed
from metatuner.tasks.numeric import extract_answer_is, last_number, numbers_equal, parse_number

DATA_TASKS = ("gsm8k", "math", "hotpotqa", "cosmosqa")
# MATH training solutions that end in an empty \boxed{} in the published data
EMPTY_MATH_ANSWERS = {"math-train-number_theory-7115", "math-train-number_theory-7117"}
SIZES = {
    "gsm8k": (7473, 1000),
    "math": (7500, 4500),
    "hotpotqa": (5000, 1500),
    "cosmosqa": (1785, 800),
}


def _example(answer: str, options: tuple[str, ...] = ()) -> Example:
    return Example(id="x", query="q", answer=answer, target="t", options=options)


def _scores(task_name: str, output: str, example: Example) -> dict[str, float]:
    task = get_task(task_name)
    return task.score(task.extract(output), example)


# ---- numeric helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("1,234", "1234"), ("$5.00", "5"), ("14.", "14"), ("12.50", "12.5"), ("-3", "-3"), ("5.0", "5")],
)
def test_parse_number_reads_written_forms(text, value):
    assert parse_number(text) == parse_number(value)
    assert str(parse_number(text).normalize()) == value


@pytest.mark.parametrize("text", ["", "abc", "1.2.3", "nan", "inf"])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


def test_extract_answer_is_takes_the_last_phrase_in_any_case():
    assert extract_answer_is("The answer is 3. No wait, the ANSWER IS: $1,234.50.") == "1234.5"
    assert extract_answer_is("The answer is **-7**") == "-7"
    assert extract_answer_is("I think it is 12.") is None


def test_last_number_handles_commas_sentence_ends_and_subtraction():
    assert last_number("She had 1,234 coins and spent 12.") == "12"
    assert last_number("In total: 1,234.") == "1234"
    assert last_number("19-5") == "5"  # "-5" here is a subtraction, not a negative number
    assert last_number("It fell to -4 degrees") == "-4"
    assert last_number("no digits") is None


def test_numbers_equal():
    assert numbers_equal("12.50", "12.5")
    assert numbers_equal("$5.00", "5")
    assert numbers_equal("1,234", "1234")
    assert not numbers_equal("5", "6")
    assert not numbers_equal(None, "5")
    assert not numbers_equal("five", "5")


# ---- GSM8K and arithmetic ----------------------------------------------------------------------


def test_gsm8k_row_becomes_a_cleaned_solution_ending_in_the_answer_phrase():
    row = {"id": "g1", "question": "Q?", "answer": "She has 1000+234 = <<1000+234=1234>>1234.\n#### 1,234"}
    example = get_task("gsm8k").example_from_row(row)
    assert example.answer == "1234"
    assert example.target == "She has 1000+234 = 1234.\nThe answer is 1234."


@pytest.mark.parametrize("task_name", ["gsm8k", "arithmetic"])
@pytest.mark.parametrize(
    "output, gold, strict, flexible",
    [
        ("6 * 2 = 12. The answer is 1,234.", "1234", 1.0, 1.0),
        ("So she pays $5.00 in total.", "5", 0.0, 1.0),
        ("The answer is $5.00", "5", 1.0, 1.0),
        ("The answer is 12.50.", "12.5", 1.0, 1.0),
        ("the answer is 4. Then 4 + 2 = 6. The answer is 6", "6", 1.0, 1.0),
        ("The answer is 7, because 3 + 3 = 6", "6", 0.0, 0.0),
        ("I am not sure.", "6", 0.0, 0.0),
    ],
)
def test_numeric_extraction_and_scores(task_name, output, gold, strict, flexible):
    assert _scores(task_name, output, _example(gold)) == {
        "exact_match_strict": strict,
        "exact_match_flexible": flexible,
    }


def test_gsm8k_row_without_final_line_is_an_error():
    with pytest.raises(MetatunerError, match="g7.*'#### N'"):
        get_task("gsm8k").example_from_row({"id": "g7", "question": "Q?", "answer": "It is 5."})


# ---- MATH --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, boxed",
    [
        ("so $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{1}, then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("$x^2 + y^2 = \\boxed 9$.", "9"),
        ("\\fbox{3}", "3"),
        ("\\boxed{\\frac{1}{2}", None),  # cut off before the closing brace
        ("the answer is 3", None),
    ],
)
def test_last_boxed_balances_braces(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    "gold, predicted, same",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{1}{2}", "\\dfrac12", True),
        ("3", "x=3", True),
        ("5\\sqrt{2}", "\\sqrt{50}", True),
        ("(1,2]", "(1, 2]", True),
        ("\\frac{1}{2}", "\\frac{1}{3}", False),
        ("3", None, False),
        ("", "", False),
    ],
)
def test_math_equivalence(gold, predicted, same):
    assert equivalent(gold, predicted) is same


def test_math_equivalence_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(equivalent("\\frac{1}{2}", "0.5")))
    thread.start()
    thread.join()
    assert results == [True]


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("We get $\\boxed{0.5}$.", 1.0, 1.0),
        ("The answer is $\\frac{1}{2}$.", 0.0, 1.0),
        ("Dividing, we find $x = \\frac12$ and we are done.", 0.0, 1.0),
        ("We get $\\boxed{2}$, so the answer is 1/2.", 0.0, 0.0),
        ("No idea.", 0.0, 0.0),
    ],
)
def test_math_extraction_and_scores(output, strict, flexible):
    assert _scores("math", output, _example("\\frac{1}{2}")) == {
        "accuracy_strict": strict,
        "accuracy_flexible": flexible,
    }


def test_math_row_without_boxed_answer_is_an_error():
    row = {"id": "m3", "problem": "P", "solution": "It is 4.", "level": "Level 1", "type": "Algebra"}
    with pytest.raises(MetatunerError, match="m3.*boxed"):
        get_task("math").example_from_row(row)


# ---- HotpotQA ----------------------------------------------------------------------------------


def test_hotpotqa_normalisation_drops_case_punctuation_and_articles():
    assert normalize_answer("The Beatles.") == "beatles"
    assert normalize_answer("  An   apple, a day! ") == "apple day"


def test_hotpotqa_f1():
    assert f1("Greenwich Village", "Greenwich Village, New York City") == pytest.approx(4 / 7)
    assert f1("the Beatles", "Beatles") == 1.0
    assert f1("yes", "yes") == 1.0
    assert f1("no", "yes") == 0.0
    # yes/no must match exactly: no partial credit for sharing the token
    assert f1("yes it is", "yes") == 0.0
    assert f1("Paris", "Rome") == 0.0
    assert f1(None, "Rome") == 0.0
    assert exact_match("THE BEATLES!", "Beatles") == 1.0


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("The answer is The Beatles.", "The Beatles", "The Beatles"),
        ("The answer is Paris. It is the capital of France.", "Paris", "Paris"),
        ("The answer is St. Louis Cardinals.", "St. Louis Cardinals", "St. Louis Cardinals"),
        ("The answer is Rome. No wait, the answer is Paris.", "Paris", "Paris"),
        ("the answer is: yes\nBecause both are American.", "yes", "yes"),
        ("Chief of Protocol.\nShe served under two presidents.", None, "Chief of Protocol"),
        ("", None, None),
    ],
)
def test_hotpotqa_extraction(output, strict, flexible):
    assert get_task("hotpotqa").extract(output) == {"strict": strict, "flexible": flexible}


def test_hotpotqa_scores():
    scores = _scores("hotpotqa", "Beatles.\nThey were from Liverpool.", _example("The Beatles"))
    assert scores == {
        "exact_match_strict": 0.0,
        "f1_strict": 0.0,
        "exact_match_flexible": 1.0,
        "f1_flexible": 1.0,
    }
    scores = _scores("hotpotqa", "The answer is no.", _example("yes"))
    assert scores["f1_strict"] == scores["f1_flexible"] == 0.0


# ---- Cosmos QA ---------------------------------------------------------------------------------

COSMOS_ROW = {
    "id": "c1",
    "context": "The bus was late again .",
    "question": "Why was she late ?",
    "answer0": "She overslept .",
    "answer1": "The bus came late .",
    "answer2": "She walked slowly .",
    "answer3": "None of the above choices .",
    "label": 1,
}


def test_cosmosqa_row_lists_the_options_as_letters():
    task = get_task("cosmosqa")
    example = task.example_from_row(COSMOS_ROW)
    assert example.query.endswith(
        "A) She overslept .\nB) The bus came late .\nC) She walked slowly .\nD) None of the above choices ."
    )
    assert example.query.startswith("Context: The bus was late again .\nQuestion: Why was she late ?")
    assert (example.answer, example.target, example.meta) == ("B", "The answer is B.", {"label": 1})
    assert task.choices(example) == [COSMOS_ROW[f"answer{i}"] for i in range(4)]


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("The answer is B.", "B", "B"),
        ("The answer is (B)", "B", "B"),
        ("I think the answer is B) The bus came late.", "B", "B"),
        ("The answer is option B", "B", "B"),
        ("The answer is C. No, the answer is B.", "B", "B"),
        ("B) The bus came late .", None, "B"),
        ("Option (B) fits best.", None, "B"),
        ("The bus came late, I think.", None, "The bus came late, I think."),
        ("The answer is a bus.", None, "The answer is a bus."),
        ("The answer is A", "A", "A"),
    ],
)
def test_cosmosqa_extraction(output, strict, flexible):
    assert get_task("cosmosqa").extract(output) == {"strict": strict, "flexible": flexible}


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("The answer is (B).", 1.0, 1.0),
        ("B", 0.0, 1.0),
        ("Because the bus came late.", 0.0, 1.0),  # names option B by its text
        ("None of the above choices.", 0.0, 0.0),
        ("The answer is D.", 0.0, 0.0),
        ("Nothing fits.", 0.0, 0.0),
    ],
)
def test_cosmosqa_scores(output, strict, flexible):
    task = get_task("cosmosqa")
    example = task.example_from_row(COSMOS_ROW)
    scores = task.score(task.extract(output), example)
    assert scores == {"accuracy_strict": strict, "accuracy_flexible": flexible}


# ---- the built-in arithmetic task --------------------------------------------------------------


def test_arithmetic_is_deterministic_and_sized():
    task = get_task("arithmetic")
    assert task.load("test") == task.load("test")
    assert generate("train") == generate("train")
    assert (len(task.load("train")), len(task.load("test"))) == (2000, 500)
    assert task.load("test")[17].id == "arithmetic-test-17"


def test_arithmetic_splits_are_disjoint_and_distinct():
    train = {e.query for e in get_task("arithmetic").load("train")}
    test = [e.query for e in get_task("arithmetic").load("test")]
    assert len(train) == 2000 and len(set(test)) == 500
    assert not train & set(test)


def test_arithmetic_targets_score_their_own_answers():
    task = get_task("arithmetic")
    for split in ("train", "test"):
        for example in task.load(split):
            assert int(example.answer) >= 0
            assert example.target.endswith(f"The answer is {example.answer}.")
            assert task.score(task.extract(example.target), example) == {
                "exact_match_strict": 1.0,
                "exact_match_flexible": 1.0,
            }


def test_arithmetic_ignores_the_data_folder(tmp_path):
    assert get_task("arithmetic", tmp_path).load("test") == get_task("arithmetic").load("test")


# ---- loading the local benchmark data ----------------------------------------------------------


@pytest.mark.parametrize("task_name", DATA_TASKS)
def test_local_data_counts_and_gold_answers(task_name, shared_data):
    task = get_task(task_name, shared_data)
    for split, size in zip(("train", "test"), SIZES[task_name]):
        examples = task.load(split)
        assert len(examples) == size
        assert len({e.id for e in examples}) == size
        for e in examples:
            assert e.query.strip(), e.id
            assert e.answer.strip() or e.id in EMPTY_MATH_ANSWERS, e.id
            if task_name == "gsm8k":
                assert parse_number(e.answer) is not None, e.id
            if task_name == "cosmosqa":
                assert e.answer in LETTERS and len(e.options) == 4 and LETTERS[e.meta["label"]] == e.answer


@pytest.mark.parametrize("task_name", sorted(set(TASKS.names())))
def test_target_and_extraction_agree(task_name, shared_data):
    task = get_task(task_name, shared_data)
    for split in ("train", "test"):
        for example in task.load(split)[:20]:
            scores = task.score(task.extract(example.target), example)
            assert scores[task.primary_metric] == 1.0, (example.id, example.target)
            assert all(0.0 <= v <= 1.0 for v in scores.values())


# ---- bad input ---------------------------------------------------------------------------------


def _write(tmp_path, task_name: str, split: str, lines: list[str]):
    folder = tmp_path / task_name
    folder.mkdir(exist_ok=True)
    path = folder / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_missing_file(tmp_path):
    with pytest.raises(MetatunerError, match="data file not found: .*gsm8k.*test.jsonl"):
        get_task("gsm8k", tmp_path).load("test")


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps({"id": "h1", "question": "Q?", "answer": "A", "type": "bridge"})
    path = _write(tmp_path, "hotpotqa", "train", [good, "{not json"])
    with pytest.raises(MetatunerError) as info:
        get_task("hotpotqa", tmp_path).load("train")
    assert f"{path}:2" in str(info.value) and "malformed JSON" in str(info.value)


def test_row_without_the_task_fields(tmp_path):
    path = _write(tmp_path, "cosmosqa", "test", [json.dumps({"id": "c1", "context": "C", "question": "Q"})])
    with pytest.raises(MetatunerError) as info:
        get_task("cosmosqa", tmp_path).load("test")
    message = str(info.value)
    assert f"{path}:1" in message and "answer0" in message and "label" in message and "cosmosqa" in message


def test_empty_split(tmp_path):
    _write(tmp_path, "math", "test", [])
    with pytest.raises(MetatunerError, match="test split of task 'math' is empty"):
        get_task("math", tmp_path).load("test")


def test_unknown_task_lists_available_names():
    with pytest.raises(MetatunerError) as info:
        get_task("gsm9k")
    message = str(info.value)
    assert "unknown task 'gsm9k'" in message
    assert "available: arithmetic, cosmosqa, gsm8k, hotpotqa, math, mixture" in message


def test_unknown_split():
    with pytest.raises(MetatunerError, match="unknown split 'dev' of task 'arithmetic'; available: train, test, test_shift"):
        get_task("arithmetic").load("dev")


def test_every_task_declares_its_prompts_and_primary_metric():
    for name in TASKS.names():
        task = get_task(name)
        assert task.instruction and task.cot_instruction and task.cot_instruction != task.instruction
        scores = task.score(task.extract(""), _example("B", ("x", "y", "z", "w")))
        assert task.primary_metric in scores and set(scores.values()) == {0.0}


def test_hotpotqa_sentence_after_a_number_and_leading_yes_no():
    task = get_task("hotpotqa")
    assert task.extract("The answer is 10. The arena can seat 10 people.")["strict"] == "10"
    assert task.extract("The answer is 3.5 million.")["strict"] == "3.5 million"
    assert task.extract("No, the two mosques are in different districts.")["flexible"] == "no"
    assert task.extract("Yes.")["flexible"] == "yes"
    assert task.extract("Nobody knows.")["flexible"] == "Nobody knows"
