"""Batch prediction: one line per query with prompt, output and extracted answer; batched; resumes after an
interruption (also one that tore the last line) without answering a query twice; any method's predictor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metatuner.cli import main
from metatuner.errors import MetatunerError
from metatuner.evaluation.predictors import Prediction, Predictor
from metatuner.files import resume_jsonl
from metatuner.serving.predict import predict_file
from metatuner.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
SPEC = f"file:{ROOT / 'examples' / 'capitals.yaml'}"


class Scripted(Predictor):
    """Answers "The answer is <query reversed>."; records the batches; raises KeyboardInterrupt on batch ``stop_at``."""

    def __init__(self, stop_at: int | None = None):
        self.batches: list[list[str]] = []
        self.stop_at = stop_at

    def predict(self, task, examples, max_new_tokens):
        if len(self.batches) == self.stop_at:
            raise KeyboardInterrupt
        self.batches.append([ex.id for ex in examples])
        return [Prediction("p~", ex.query, f"The answer is {ex.query[::-1]}.", 3) for ex in examples]


def queries(tmp_path: Path, n: int = 7) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "country": f"Land {i}"}) + "\n" for i in range(n)))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_query_gets_prompt_output_and_extracted_answer_in_batches(tmp_path):
    task, predictor, out = get_task(SPEC), Scripted(), tmp_path / "out.jsonl"
    assert predict_file(predictor, task, queries(tmp_path), out, batch_size=3, progress=False) == (7, 7)
    assert [len(b) for b in predictor.batches] == [3, 3, 1]
    first = lines(out)[0]
    assert first == {"id": "q0", "query": "What is the capital of Land 0?", "prompt": "p~",
                     "output": "The answer is ?0 dnaL fo latipac eht si tahW.", "answer": "?0 dnaL fo latipac eht si tahW",
                     "extracted": {"strict": "?0 dnaL fo latipac eht si tahW", "flexible": "?0 dnaL fo latipac eht si tahW"}}


def test_an_interrupted_run_resumes_without_redoing_or_duplicating(tmp_path):
    task, out, source = get_task(SPEC), tmp_path / "out.jsonl", queries(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        predict_file(Scripted(stop_at=2), task, source, out, batch_size=2, progress=False)
    assert [r["id"] for r in lines(out)] == ["q0", "q1", "q2", "q3"]
    with out.open("a") as f:
        f.write('{"id": "q4", "query": "What is the ca')  # a write torn by the interruption
    again = Scripted()
    assert predict_file(again, task, source, out, batch_size=2, progress=False) == (7, 3)
    assert again.batches == [["q4", "q5"], ["q6"]]
    assert [r["id"] for r in lines(out)] == [f"q{i}" for i in range(7)]
    reference = tmp_path / "ref.jsonl"
    predict_file(Scripted(), task, source, reference, batch_size=7, progress=False)
    assert lines(out) == lines(reference)
    done = Scripted()
    assert predict_file(done, task, source, out, progress=False) == (7, 0) and done.batches == []


def test_rows_with_gold_answers_are_scored_and_field_takes_the_query_as_is(tmp_path):
    task, out = get_task(SPEC), tmp_path / "out.jsonl"
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"country": "Peru", "capital": "?ureP fo latipac eht si tahW"}) + "\n")
    predict_file(Scripted(), task, source, out, progress=False)
    [row] = lines(out)
    assert row["id"] == "line-1" and row["gold"] == "?ureP fo latipac eht si tahW"
    assert row["scores"] == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    predict_file(Scripted(), task, source, tmp_path / "raw.jsonl", field="country", progress=False)
    assert lines(tmp_path / "raw.jsonl")[0]["query"] == "Peru"


@pytest.mark.parametrize(
    "rows, field, message",
    [
        ([{"id": "a", "country": "X"}, {"id": "a", "country": "Y"}], None, "in.jsonl:2: id 'a' repeats line 1"),
        ([{"id": "a", "nation": "X"}], None, "in.jsonl:1: row lacks field(s) country"),
        ([{"id": "a", "nation": "X"}], "question", "in.jsonl:1: row lacks field 'question'; its fields"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, rows, field, message):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MetatunerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict_file(Scripted(), get_task(SPEC), source, tmp_path / "out.jsonl", field=field, progress=False)


def test_an_output_file_of_something_else_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("not json\n")
    with pytest.raises(MetatunerError, match="out.jsonl:1: not a line this command wrote"):
        resume_jsonl(out)


@pytest.mark.parametrize("method", ["zero-shot", "sft"])
def test_cli_predict_with_any_registered_method(capsys, tmp_path, tiny_model_dir, method):
    out = tmp_path / "out.jsonl"
    argv = ["predict", "--method", method, "--task", SPEC, "--model", str(tiny_model_dir), "--input",
            str(ROOT / "examples" / "capitals" / "queries.jsonl"), "--out", str(out), "--batch-size", "2",
            "eval.max_new_tokens=3", "train.steps=2", "train.batch_size=2", "data.train_limit=4", "data.val_size=2"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"{method}: answered 3 queries" in capsys.readouterr().out
    assert [r["id"] for r in lines(out)] == ["malta", "cyprus", "haiti"]
    assert all(r["prompt"] == get_task(SPEC).instruction for r in lines(out))
    assert main(argv) == 0 and "answered 0 queries, 3 were already in" in capsys.readouterr().out


def test_cli_predict_needs_exactly_one_predictor_and_an_input(capsys, tmp_path):
    assert main(["predict", "--input", "x.jsonl", "--out", "o.jsonl"]) == 2
    assert "give --run DIR or --method NAME" in capsys.readouterr().err
    assert main(["predict", "--method", "zero-shot", "--input", str(tmp_path / "none.jsonl"), "--out", "o.jsonl"]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err
