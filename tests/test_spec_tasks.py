"""Tasks from spec files: the shipped example, every data format and metric, grading equal to the built-in task
with the same metric, and errors that name the file, the line and the field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from metatuner.cli import main
from metatuner.errors import MetatunerError
from metatuner.tasks import get_task

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "capitals.yaml"


def spec(tmp_path: Path, text: str, rows: dict[str, list[dict]] | None = None) -> str:
    """Writes ``spec.yaml`` (and JSONL files per name) under tmp_path; returns the ``file:`` task name."""
    for name, items in (rows or {}).items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    (tmp_path / "spec.yaml").write_text(text)
    return f"file:{tmp_path / 'spec.yaml'}"


QA = [{"id": "a", "q": "2+2?", "a": "4"}, {"id": "b", "q": "3+4?", "a": "7"}]


def test_the_shipped_example_loads_and_grades():
    task = get_task(f"file:{EXAMPLE}")
    train, test = task.load("train"), task.load("test")
    assert task.name == "capitals" and len(train) >= 90 and len(test) >= 20
    assert not {ex.query for ex in train} & {ex.query for ex in test}
    ex = train[0]
    assert ex.query.startswith("What is the capital of ") and ex.target == f"The answer is {ex.answer}."
    assert task.grade(f"The answer is {ex.answer}.", ex)[1] == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert task.grade("The answer is Atlantis.", ex)[1]["exact_match_flexible"] == 0.0
    assert task.max_new_tokens == 16 and "city" in task.instruction and task.primary_metric == "exact_match_flexible"


def test_csv_and_parquet_give_the_same_examples_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "q": "2+2?", "a": "4"}, {"id": "b", "q": "3+4?", "a": "7"}]
    (tmp_path / "t.csv").write_text("id,q,a\na,2+2?,4\nb,3+4?,7\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    loaded = {}
    for fmt in ("jsonl", "csv", "parquet"):
        name = spec(tmp_path, f"data: {{test: t.{fmt}}}\ntemplate: 'Q: {{q}}'\nanswer: a\nmetric: numeric\n", {"t.jsonl": rows})
        loaded[fmt] = get_task(name).load("test")
    assert loaded["jsonl"] == loaded["csv"] == loaded["parquet"]
    assert [ex.query for ex in loaded["csv"]] == ["Q: 2+2?", "Q: 3+4?"]


@pytest.mark.parametrize("builtin, metric", [("gsm8k", "numeric"), ("hotpotqa", "f1"), ("math", "math")])
@pytest.mark.parametrize("output", ["The answer is 12.", "so 12", "\\boxed{12}", "yes it is", "The answer is $\\frac{1}{2}$."])
def test_a_spec_grades_like_the_builtin_task_with_its_metric(tmp_path, builtin, metric, output):
    from metatuner.tasks.base import Example

    task = get_task(spec(tmp_path, f"data: {{test: t.jsonl}}\nanswer: a\ntemplate: '{{q}}'\nmetric: {metric}\n"))
    other = get_task(builtin)
    for gold in ("12", "0.5", "yes"):
        ex = Example("x", "q", gold, "")
        assert task.grade(output, ex) == other.grade(output, ex)
    assert task.primary_metric == other.primary_metric


def test_multiple_choice_from_option_fields_or_a_list_field(tmp_path):
    rows = [{"id": "1", "q": "Sky?", "o1": "green", "o2": "blue", "o3": "red", "gold": 1},
            {"id": "2", "q": "Grass?", "o1": "green", "o2": "blue", "o3": "red", "gold": "A"},
            {"id": "3", "q": "Blood?", "o1": "green", "o2": "blue", "o3": "red", "gold": "red"}]
    task = get_task(spec(tmp_path, "data: {test: t.jsonl}\ntemplate: '{q}'\nanswer: gold\noptions: [o1, o2, o3]\n"
                         "metric: letter\n", {"t.jsonl": rows}))
    examples = task.load("test")
    assert [ex.answer for ex in examples] == ["B", "A", "C"] and examples[0].meta == {"label": 1}
    assert examples[0].query == "Sky?\nOptions:\nA) green\nB) blue\nC) red"
    assert task.choices(examples[0]) == ["green", "blue", "red"]
    assert task.grade("The answer is B", examples[0])[1] == {"accuracy_strict": 1.0, "accuracy_flexible": 1.0}
    assert task.grade("blue, of course", examples[0])[1]["accuracy_flexible"] == 1.0
    listed = [{"id": "1", "q": "Sky?", "choices": ["green", "blue"], "gold": 1}]
    task = get_task(spec(tmp_path, "data: {test: l.jsonl}\ntemplate: '{q}'\nanswer: gold\noptions: [choices]\n"
                         "metric: letter\n", {"l.jsonl": listed}))
    assert task.load("test")[0].query == "Sky?\nOptions:\nA) green\nB) blue"


def test_regex_and_python_callable_metrics(tmp_path, monkeypatch):
    task = get_task(spec(tmp_path, "data: {test: t.jsonl}\ntemplate: '{q}'\nanswer: a\ninstruction: 'Reply ANSWER: x'\n"
                         "metric: {name: regex, pattern: 'ANSWER: *(\\w+)'}\n", {"t.jsonl": QA}))
    ex = task.load("test")[0]
    assert ex.target == "4"
    assert task.grade("ANSWER: 5 ... ANSWER: 4", ex) == ({"strict": "4", "flexible": "4"},
                                                       {"exact_match_strict": 1.0, "exact_match_flexible": 1.0})
    (tmp_path / "my_metric.py").write_text("def close(output, answer):\n"
                                           "    return {'hit': float(answer in output), 'short': float(len(output) < 5)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task(spec(tmp_path, "data: {test: t.jsonl}\ntemplate: '{q}'\nanswer: a\ninstruction: p\n"
                         "metric: {name: 'my_metric:close', primary: hit}\n", {"t.jsonl": QA}))
    assert task.primary_metric == "hit"
    assert task.grade("it is 4", task.load("test")[0])[1] == {"hit": 1.0, "short": 0.0}
    sys.modules.pop("my_metric", None)


def test_a_hub_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append((path, name, split, revision))
        return [{"question": "2+2?", "answer": "4"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = get_task(spec(tmp_path, "data: {hub: me/qa, hub_config: main, test_split: validation}\nmetric: numeric\n"))
    [ex] = task.load("test")
    assert calls == [("me/qa", "main", "validation", None)] and ex.query == "2+2?" and ex.answer == "4"
    assert ex.id == "spec-test-0"  # as the built-in tasks name hub rows


def test_rows_without_an_answer_are_queries(tmp_path):
    task = get_task(spec(tmp_path, "data: {test: t.jsonl}\ntemplate: 'Q: {q}'\nanswer: a\nmetric: numeric\n"))
    ex = task.query_example({"id": "z", "q": "1+1?"}, "in.jsonl", 3)
    assert (ex.query, ex.answer) == ("Q: 1+1?", "")
    with pytest.raises(MetatunerError, match=r"in.jsonl:3: row lacks field\(s\) q"):
        task.query_example({"id": "z", "question": "1+1?"}, "in.jsonl", 3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: {test: t.jsonl}\ntemplate: '{q}'\nanswer: a\nmetric: numeric\nmax_tokens: 3\n",
         "spec.yaml:5: unknown config key 'max_tokens'; allowed: name, version"),
        ("data: {test: t.jsonl}\ntemplate: '{q}'\nanswer: a\nmetric: bleu\n", "spec.yaml:4: unknown metric 'bleu'; available: numeric, exact"),
        ("data:\n  test: t.jsonl\n  shuffle: true\ntemplate: '{q}'\n", "spec.yaml:3: unknown config key 'data.shuffle'"),
        ("data: {test: t.jsonl}\ntemplate: '{q}'\nmax_new_tokens: many\n", "spec.yaml:3: max_new_tokens must be int"),
        ("data: {test: t.jsonl}\ntemplate: 'no fields'\n", "spec.yaml:2: template 'no fields' names no field"),
        ("data: {test: t.jsonl}\ntemplate: '{q}'\nmetric: regex\n", "spec.yaml:3: metric regex needs metric.pattern"),
        ("data: {test: t.jsonl}\ntemplate: '{q}'\nanswer: a\nmetric: letter\n", "spec.yaml:4: options (the fields"),
        ("template: '{q}'\n", "spec.yaml:1: data names no rows"),
        ("data: {test: t.jsonl}\ntemplate: '{q}\n", "spec.yaml:2: invalid YAML"),
        ("data: {train: t.jsonl}\ntemplate: '{q}'\nanswer: a\n", "has no test split; set data.test"),
        ("data: {test: t.jsonl}\ntemplate: '{q} {context}'\nanswer: a\n", "t.jsonl:1: row lacks field(s) context named by"),
        ("data: {test: t.jsonl}\ntemplate: '{q}'\nanswer: a\noptions: [q, id]\nmetric: letter\n",
         "t.jsonl:1: field 'a' = '4' names no option; give a letter (A, B)"),
    ],
)
def test_errors_name_the_file_line_and_field(tmp_path, text, message):
    name = spec(tmp_path, text, {"t.jsonl": QA})
    with pytest.raises(MetatunerError) as e:
        get_task(name).load("test")
    assert message in str(e.value) and str(e.value).count("\n") == 0


def test_cli_commands_take_a_spec(capsys, tmp_path, tiny_model_dir):
    name = f"file:{EXAMPLE}"
    assert main(["tasks", name]) == 0
    out = capsys.readouterr().out
    assert "capitals" in out and "template: What is the capital of {country}?" in out and "metric: exact" in out
    code = main(["eval", "--task", name, "--model", str(tiny_model_dir), "--limit", "2", "--out", str(tmp_path / "e"),
                 "eval.max_new_tokens=3"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["task"] == "capitals" and summary["config"]["data"]["task"] == name and summary["n"] == 2
    assert main(["rescore", str(tmp_path / "e")]) == 0
    assert main(["eval", "--task", "file:nowhere.yaml", "--model", str(tiny_model_dir)]) == 2
    assert "task spec file not found" in capsys.readouterr().err


def test_bench_runs_a_spec_task_in_a_plainly_named_cell(tmp_path, tiny_model_dir):
    import yaml

    from metatuner.bench.cells import cell_dir
    from metatuner.bench.grid import run_grid
    from metatuner.bench.protocol import Protocol

    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({
        "tasks": [f"file:{EXAMPLE}"], "seeds": [0], "methods": {"zero-shot": {}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 2, "max_new_tokens": 3}}}))
    [row] = run_grid(Protocol.load(protocol), tmp_path / "grid")
    assert row["task"] == "capitals" and row["n"] == 2
    assert (tmp_path / "grid" / "cells" / "capitals--zero-shot--seed0" / "summary.json").is_file()
    assert cell_dir(tmp_path, f"file:{EXAMPLE}>gsm8k", "sft", 0).name == "capitals-to-gsm8k--sft--seed0"


def test_a_cross_task_mix_with_a_spec_describes_itself_and_takes_queries(tmp_path):
    task = get_task(f"file:{EXAMPLE}+hotpotqa>file:{EXAMPLE}")
    assert task.card()["train_tasks"] == ["capitals", "hotpotqa"] and task.card()["test_task"]["metric"] == "exact"
    example = task.query_example({"id": "q", "country": "Peru"}, "in.jsonl", 1)
    assert example.query == "What is the capital of Peru?" and task.instruction_for(example) == task.instruction
