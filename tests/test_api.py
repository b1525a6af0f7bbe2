"""The public Python API (``metatuner.api``, re-exported from ``metatuner``): configs with keyword overrides,
tasks from Python objects with a callable metric, train / resume / load / answer / evaluate / export on a tiny
model, fitting any method, and errors that name no command-line flag; ``examples/python_api.py`` runs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import metatuner
from metatuner import MetatunerError

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"country": c, "capital": k} for c, k in [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago")]]


def tiny(model_dir) -> dict:
    """Overrides that train the tiny model in two steps (one of M's warm-up, one joint) and answer in 4 tokens."""
    return {"model": {"name": str(model_dir)}, "data": {"val_size": 2},
            "train": {"steps": 2, "batch_size": 2, "rollouts": 2, "actor_warmup_steps": 1, "generator_warmup_queries": 2,
                      "generator_warmup_steps": 0, "save_every": 1, "prompt_branch": "always"},
            "generator": {"max_prompt_tokens": 4}, "eval": {"max_new_tokens": 4, "batch_size": 4}}


def in_output(output: str, answer: str) -> float:
    return float(answer.lower() in output.lower())


def capitals(**kw):
    return metatuner.make_task(train=ROWS[:7], test=ROWS[7:], template="What is the capital of {country}?",
                               answer="capital", metric=in_output, name="capitals", instruction="Name the city.",
                               max_new_tokens=4, **kw)


# ---- configs and tasks (no model) ------------------------------------------------------------------
def test_load_config_takes_keyword_dict_dotted_and_string_overrides():
    cfg = metatuner.load_config("quick", {"eval.limit": 5, "train": {"rollouts": 3}}, train={"steps": 7},
                                **{"model.name": "m"})
    assert (cfg.train.steps, cfg.train.rollouts, cfg.eval.limit, cfg.model.name) == (7, 3, 5, "m")
    assert cfg.train.batch_size == 4 and cfg.data.train_limit == 400  # the rest of quick.yaml holds
    again = metatuner.load_config(cfg, ["seed=3"], eval={"batch_size": 2})  # a RunConfig as the base
    assert (again.seed, again.eval.batch_size, again.train.steps, again.eval.limit) == (3, 2, 7, 5)
    with pytest.raises(MetatunerError, match="unknown config key 'trian'; allowed: method, model"):
        metatuner.load_config(trian={"steps": 1})
    with pytest.raises(MetatunerError, match="train.steps must be int"):
        metatuner.load_config(**{"train.steps": "many"})


def test_a_task_from_dicts_a_dataset_or_a_dataframe_is_the_same_task():
    import datasets
    import pandas as pd

    kw = dict(template="What is the capital of {country}?", answer="capital", metric="exact", name="capitals")
    tasks = [metatuner.make_task(train=data, test=data, **kw)
             for data in (ROWS, datasets.Dataset.from_list(ROWS), pd.DataFrame(ROWS))]
    loaded = [t.load("train") for t in tasks]
    assert loaded[0] == loaded[1] == loaded[2] and len(loaded[0]) == len(ROWS)
    first = loaded[0][0]
    assert (first.id, first.query, first.answer, first.target) == (
        "capitals-train-1", "What is the capital of France?", "Paris", "The answer is Paris.")
    assert tasks[0].grade("The answer is Paris.", first)[1]["exact_match_flexible"] == 1.0
    assert metatuner.make_task(train=ROWS, **kw).card()["data"] == {"train": "10 rows given in Python"}


def test_a_callable_metric_scores_the_whole_output_against_the_gold_answer():
    task = capitals()
    example = task.load("test")[0]  # Norway
    assert task.grade("It is Oslo, of course", example)[1] == {"score": 1.0}
    assert task.grade("Bergen", example)[1] == {"score": 0.0}
    assert task.primary_metric == "score" and example.target == "Oslo"
    assert task.metric == f"{in_output.__module__}:in_output"  # importable by name: a run folder records it so
    assert metatuner.make_task(train=ROWS, metric=lambda o, a: 1.0, instruction="x").metric == "python:<lambda>"

    def two(output: str, answer: str) -> dict:
        return {"hit": float(answer in output), "short": float(len(output) < 10)}

    task = metatuner.make_task(train=ROWS, template="{country}", answer="capital", metric=two, primary="hit",
                               instruction="City?")
    assert task.primary_metric == "hit" and task.grade("Paris", task.load("train")[0])[1] == {"hit": 1.0, "short": 1.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"train": [{"country": "France"}]}, r"capitals\[train\]:1: row lacks field\(s\) capital named by task 'capitals'"),
    ({"train": ["France"]}, "train row 1: a row is a mapping of field names to values, got a str"),
    ({"train": {"country": "France"}}, "train rows: give a list of dicts, a datasets.Dataset or a pandas DataFrame"),
    ({}, "no rows given"),
    ({"train": ROWS, "metric": "regex"}, "metric regex needs metric.pattern"),
    ({"train": ROWS, "metric": in_output, "instruction": None}, "has no default instruction; set instruction"),
    ({"train": ROWS, "template": "no fields"}, "names no field"),
])
def test_bad_task_input_is_one_clear_error(kwargs, message):
    args = {"template": "What is the capital of {country}?", "answer": "capital", "name": "capitals",
            "instruction": "Name the city.", **kwargs}
    with pytest.raises(MetatunerError, match=message) as e:
        metatuner.make_task(**args).load("train")
    assert "--" not in str(e.value)


def test_the_api_docstring_examples_hold(monkeypatch):
    """The examples that need no model (configs, tasks) run as doctests; the others are code to read."""
    import doctest

    from metatuner.api import fitting, inputs, runs

    monkeypatch.chdir(ROOT)
    results = [doctest.testmod(m, optionflags=doctest.ELLIPSIS) for m in (inputs, runs, fitting)]
    assert sum(r.failed for r in results) == 0 and sum(r.attempted for r in results) >= 5


def test_load_task_by_name_or_spec_file():
    assert metatuner.load_task("arithmetic").name == "arithmetic"
    spec = metatuner.load_task(ROOT / "examples" / "capitals.yaml")
    assert spec.name == "capitals" and spec.load("test")[0].query.startswith("What is the capital of")


# ---- train, resume, load, answer, evaluate, export (one tiny run for the module) ------------------
@pytest.fixture(scope="module")
def model_dir(lively_model_dir):
    """The tiny model with larger random weights: its greedy answers are not empty."""
    return lively_model_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    run_dir = tmp_path_factory.mktemp("api") / "run"
    task = capitals()
    return metatuner.train(task=task, run_dir=run_dir, progress=False, **tiny(model_dir)), task


def test_train_returns_a_run_with_its_predictor_task_config_folder_and_results(trained):
    run, task = trained
    assert isinstance(run, metatuner.Run) and run.task is task and run.method == "metatuner"
    spec = run.run_dir.resolve() / "task" / "task.yaml"  # the task, written as a spec file with its rows
    assert run.config.data.task == f"file:{spec}" and run.config.train.steps == 2
    assert f"file:{spec}" in (run.run_dir / "config.yaml").read_text()
    saved = metatuner.load_task(spec)
    assert saved.load("train") == task.load("train") and saved.load("test") == task.load("test")
    assert saved.metric == task.metric and saved.instruction == task.instruction
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"
    [result] = run.results
    assert result.out_dir == run.run_dir / "eval-test" and result.n == 3 and not run.results_reused
    # the callable metric scored every test row
    assert result.score == sum(in_output(r["output"], r["gold"]) for r in result.records) / 3
    assert run.metatuner is run.predictor.mt


def test_answer_gives_prompt_output_and_extracted_answer_per_question(trained):
    run, _ = trained
    answers = run.answer(["What is the capital of Peru?", {"country": "Chile", "capital": "Santiago"}], batch_size=1)
    assert [a.id for a in answers] == ["1", "2"] and answers[1].query == "What is the capital of Chile?"
    assert all(a.prompt and a.output for a in answers)
    assert answers[0].answer == answers[0].output.strip() and answers[0].scores is None  # no gold: not scored
    assert answers[1].gold == "Santiago" and answers[1].scores == {"score": in_output(answers[1].output, "Santiago")}
    assert set(answers[0].to_dict()) == {"id", "query", "prompt", "output", "answer", "extracted"}
    # the same questions in one batch give the same answers (greedy decoding)
    assert [a.output for a in run.answer(["What is the capital of Peru?"])] == [answers[0].output]
    with pytest.raises(MetatunerError, match="wrap one question"):
        run.answer("What is the capital of Peru?")


def test_evaluate_scores_a_split_and_writes_a_results_folder(trained, tmp_path):
    run, _ = trained
    result = run.evaluate(limit=2, out_dir=tmp_path / "e")
    assert result.n == 2 and [r["id"] for r in result.records] == [r["id"] for r in run.results[0].records[:2]]
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["n"] == 2
    with pytest.raises(MetatunerError, match="already exists; choose another out_dir") as e:
        run.evaluate(out_dir=tmp_path / "e")
    assert "--" not in str(e.value)


def test_export_adapter_writes_a_peft_folder(trained, tmp_path):
    run, _ = trained
    prompt = run.export_adapter("What is the capital of Peru?", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "adapter" / "prompt.txt").read_text().strip() == prompt.strip()
    with pytest.raises(MetatunerError, match="is not empty"):
        metatuner.export_adapter(run, "What is the capital of Peru?", tmp_path / "adapter")


def test_resume_and_load_run_give_back_the_same_model(trained):
    run, task = trained
    resumed = metatuner.train(task=task, run_dir=run.run_dir, resume=True, progress=False)
    assert resumed.results_reused and resumed.results[0].score == run.results[0].score
    again = metatuner.fit("metatuner", task=task, run_dir=run.run_dir, resume=True, evaluate=True, progress=False)
    assert again.results_reused and again.method == "metatuner" and again.config.method == "metatuner"
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"  # no steps added
    loaded = metatuner.load_run(run.run_dir)  # its task from the spec file in the run folder
    question = ["What is the capital of Norway?"]
    assert loaded.task.name == "capitals" and loaded.task.load("test") == task.load("test")
    assert [a.output for a in loaded.answer(question)] == [a.output for a in run.answer(question)]
    assert [a.output for a in metatuner.load_run(run.run_dir, task=task).answer(question)] == [
        a.output for a in run.answer(question)]


def test_the_cli_answers_with_a_run_trained_in_python(trained, tmp_path, capsys):
    from metatuner.cli import main

    run, _ = trained
    capsys.readouterr()
    assert main(["generate", "--run", str(run.run_dir), "--question", "What is the capital of Peru?",
                 "--output", str(tmp_path / "a.jsonl")]) == 0
    [record] = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert record == {**run.answer(["What is the capital of Peru?"])[0].to_dict(), "id": "question"}


def test_generate_prints_each_batch_as_soon_as_it_is_answered(trained, tmp_path, capsys, monkeypatch):
    from metatuner.api.runs import Run
    from metatuner.cli import main

    run, _ = trained
    rows = tmp_path / "q.jsonl"
    rows.write_text("".join(json.dumps({"id": c, "country": c, "capital": "?"}) + "\n" for c in ("Peru", "Chile", "Cuba")))
    answer, calls = Run.answer, []

    def second_batch_fails(self, questions, **kwargs):
        calls.append(len(questions))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a user stopping a long generate after its first batch
        return answer(self, questions, **kwargs)

    monkeypatch.setattr(Run, "answer", second_batch_fails)
    capsys.readouterr()
    assert main(["generate", "--run", str(run.run_dir), "--input", str(rows), "--batch-size", "2"]) == 130
    out = capsys.readouterr().out
    assert calls == [2, 1] and out.count("  output: ") == 2  # the first batch's answers were already out


def test_a_task_with_a_metric_not_importable_by_name_is_passed_again(tmp_path, model_dir):
    task = metatuner.make_task(train=ROWS, test=ROWS[:2], template="{country}", answer="capital",
                               metric=lambda output, answer: float(answer in output), instruction="City?", name="l")
    run = metatuner.fit("zero-shot", task=task, run_dir=tmp_path / "zs", **{"model.name": str(model_dir)})
    assert run.config.data.task == "python:l" and not (tmp_path / "zs" / "task").exists()
    with pytest.raises(MetatunerError, match="built in Python with a metric that cannot be imported by name; "
                                             "pass the task again") as e:
        metatuner.train(run_dir=tmp_path / "zs", resume=True)
    assert "--" not in str(e.value)


def test_a_taken_run_folder_is_refused_without_naming_flags(trained):
    run, task = trained
    with pytest.raises(MetatunerError, match="already exists and is not empty; resume it, or choose another") as e:
        metatuner.train(task=task, run_dir=run.run_dir)
    assert "--" not in str(e.value)


def test_fit_any_method_on_a_python_task(tmp_path, model_dir):
    task = capitals()
    run = metatuner.fit("zero-shot", task=task, run_dir=tmp_path / "zs", evaluate=True, progress=False,
                        **{"model.name": str(model_dir), "eval.max_new_tokens": 4})
    assert run.method == "zero-shot" and run.config.method == "zero-shot" and run.results[0].n == 3
    assert (tmp_path / "zs" / "config.yaml").is_file() and (tmp_path / "zs" / "eval-test" / "summary.json").is_file()
    with pytest.raises(MetatunerError, match="has no MetaTuner"):
        run.metatuner
    spec = metatuner.fit("zero-shot", task=ROOT / "examples" / "capitals.yaml", **{"model.name": str(model_dir)})
    assert spec.task.name == "capitals" and spec.config.data.task == f"file:{ROOT / 'examples' / 'capitals.yaml'}"
    sft = metatuner.fit("sft", task=task, run_dir=tmp_path / "sft", evaluate=True, progress=False, **tiny(model_dir))
    assert sft.predictor.name == "sft" and sft.results[0].n == 3 and sft.results[0].out_dir == tmp_path / "sft" / "eval-test"
    assert (tmp_path / "sft" / "log.jsonl").is_file() and not (tmp_path / "sft" / "run.lock").exists()
    with pytest.raises(MetatunerError, match="only metatuner resumes"):
        metatuner.fit("sft", task=task, resume=True)
    with pytest.raises(MetatunerError, match="unknown method 'magic'"):
        metatuner.fit("magic", task=task)


# ---- the example and docs/python.md -------------------------------------------------------------------
def test_the_python_api_example_runs(tmp_path, tiny_model_dir, capsys):
    spec = importlib.util.spec_from_file_location("python_api_example", ROOT / "examples" / "python_api.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = example.main(tmp_path, **tiny(tiny_model_dir))
    out = capsys.readouterr().out
    assert f"trained into {tmp_path / 'run'}" in out and "prompt:" in out and "test: capitals score" in out
    assert run.results[0].n == 4 and (tmp_path / "adapter-peru" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n"] == 4


def readme_python() -> str:
    text = (ROOT / "docs" / "python.md").read_text()
    block = text[text.index("<!-- python-api:start -->"):text.index("<!-- python-api:end -->")]
    [code] = re.findall(r"```python\n(.*?)```", block, re.S)
    return code


def test_the_readme_from_python_section_runs(tmp_path, model_dir, monkeypatch, capsys):
    """The "From Python" code of docs/python.md as written, with the tiny model and a two-step budget laid over the
    config it trains with (every config ``train`` resolves passes through ``load_config``)."""
    from metatuner.api import fitting

    resolve = fitting.load_config

    def tiny_config(config=None, overrides=None, /, **values):
        return resolve(resolve(config, overrides, **values), None, **tiny(model_dir))

    monkeypatch.setattr(fitting, "load_config", tiny_config)
    monkeypatch.chdir(tmp_path)  # the relative paths of docs/python.md (runs/...) resolve here
    exec(readme_python(), {"__name__": "readme"})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("capitals score = ") and "n=2" in lines[0]
    prompt, output, answer = lines[1].split(" | ")
    assert prompt and output and answer == output.strip()
    assert float(lines[2]) in (0.0, 1.0)
    assert (tmp_path / "runs" / "capitals-py" / "eval-test" / "summary.json").is_file()
    assert (tmp_path / "runs" / "cuba-adapter" / "adapter_config.json").is_file()


def test_a_taken_results_folder_names_out_dir_in_python_and_out_on_the_command_line(trained, tmp_path, capsys):
    from metatuner.cli import main

    run, _ = trained
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(MetatunerError, match="choose another out_dir") as e:
        run.evaluate(out_dir=taken)
    assert "--" not in str(e.value)
    assert main(["eval", "--run", str(run.run_dir), "--out", str(taken)]) == 2
    assert "already exists; choose another --out or remove it" in capsys.readouterr().err


def test_a_built_in_task_without_data_or_hub_names_data_dir_in_python_and_the_flag_on_the_command_line():
    from metatuner.tasks import get_task

    task = get_task("gsm8k")
    task.hub = None  # as a built-in task with no hub source: only a data folder can give its rows
    with pytest.raises(MetatunerError, match=r"give a data folder \(data_dir, or METATUNER_DATA_DIR\)") as e:
        task._load_hub("train")
    assert "--" not in str(e.value) and "give a data folder with --data-dir or METATUNER_DATA_DIR" in e.value.cli
