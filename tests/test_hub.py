"""Loading the benchmarks from the Hugging Face hub, with ``datasets.load_dataset`` faked offline: each task
asks for the right dataset, configs, splits and revision, and maps the hub's rows onto the same examples
its local JSONL files give."""

from __future__ import annotations

import pytest

from metatuner.errors import MetatunerError
from metatuner.tasks import get_task

GSM8K = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
MATH = {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Number Theory"}
HOTPOT = {"id": "5a8b57f25542995d1e6f1371", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
          "answer": "yes", "type": "comparison", "level": "hard",
          "supporting_facts": {"title": ["Scott Derrickson"], "sent_id": [0]},
          "context": {"title": ["Ed Wood"], "sentences": [["Edward Davis Wood Jr. was an American filmmaker."]]}}
COSMOS = {"id": "3Q9SPIIRWJKVQ8244310E8TUS6YWAC##34V1S5K3GTZMDUBNBIGY93FLDN690G##A1S1K7134S2VUC##Blog_1044056##q1_a1##3XU9MCX6VQQG7YPLCSAFDPQNH4GRR7",
          "context": "Good Old War and person L : I saw both of these bands Wednesday night.",
          "question": "In the future , will this person go to see other bands play ?",
          "answer0": "None of the above choices .", "answer1": "This person likes music .",
          "answer2": "This person only likes Good Old War .", "answer3": "Other Bands is not on tour .", "label": 1}


@pytest.fixture()
def fake_hub(monkeypatch):
    import datasets

    calls = []
    rows = {"openai/gsm8k": [GSM8K], "EleutherAI/hendrycks_math": [MATH], "hotpotqa/hotpot_qa": [HOTPOT],
            "allenai/cosmos_qa": [COSMOS]}

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append((path, name, split, revision))
        return [dict(r) for r in rows[path]]

    monkeypatch.delenv("METATUNER_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_gsm8k_from_the_hub(fake_hub):
    [ex] = get_task("gsm8k").load("test")
    assert fake_hub == [("openai/gsm8k", "main", "test", None)]
    assert (ex.id, ex.answer, ex.query) == ("gsm8k-test-0", "5", GSM8K["question"])


def test_math_reads_every_subject_and_keeps_ids_unique(fake_hub):
    examples = get_task("math").load("train")
    assert len(fake_hub) == 7 and {c[1] for c in fake_hub} >= {"algebra", "number_theory", "precalculus"}
    assert all(c[2] == "train" for c in fake_hub)
    assert examples[0].id == "math-train-number_theory-0" and examples[0].answer == "2"


def test_hotpotqa_is_closed_book_from_the_distractor_config(fake_hub):
    [ex] = get_task("hotpotqa").load("test")
    assert fake_hub == [("hotpotqa/hotpot_qa", "distractor", "validation", None)]
    assert (ex.id, ex.answer, ex.query) == (HOTPOT["id"], "yes", HOTPOT["question"])
    assert "Edward" not in ex.query  # context paragraphs dropped, as in the local files


def test_cosmosqa_loads_the_parquet_conversion(fake_hub):
    [ex] = get_task("cosmosqa").load("test")
    assert fake_hub == [("allenai/cosmos_qa", None, "validation", "refs/convert/parquet")]
    assert ex.answer == "B" and ex.options[1] == "This person likes music ."


def test_a_hub_failure_is_one_clear_line(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("no route to host\nlong traceback text")

    monkeypatch.delenv("METATUNER_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(MetatunerError) as e:
        get_task("gsm8k").load("train")
    msg, cli = str(e.value), e.value.cli  # what a Python caller sees, and what the command line prints
    assert "\n" not in msg and "ConnectionError: no route to host" in msg and "(data_dir, or METATUNER_DATA_DIR)" in msg
    assert "--" not in msg and "\n" not in cli and "with --data-dir or METATUNER_DATA_DIR" in cli
