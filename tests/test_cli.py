"""The CLI: listing commands, evaluation end to end, and bad input giving one line and a non-zero exit."""

import json

import pytest

from metatuner.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tasks_and_methods_are_listed(capsys):
    code, out, _ = run(capsys, "tasks")
    assert code == 0 and all(t in out for t in ("arithmetic", "cosmosqa", "gsm8k", "hotpotqa", "math", "mixture"))
    assert "splits=train, test, test_shift" in out.split("mixture")[1].splitlines()[0]
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "zero-shot" in out and "cot" in out


def test_config_lists_keys_and_resolves_overrides(capsys):
    code, out, _ = run(capsys, "config")
    assert code == 0 and "eval.limit" in out and "model.name" in out
    code, out, _ = run(capsys, "config", "eval.limit=7")
    assert code == 0 and "limit: 7" in out


def test_eval_writes_a_complete_results_folder(capsys, tmp_path, tiny_model_dir):
    out_dir = tmp_path / "r"
    code, out, err = run(capsys, "eval", "--model", str(tiny_model_dir), "--limit", "3", "--out", str(out_dir),
                         "eval.max_new_tokens=4")
    assert code == 0, err
    assert "exact_match_flexible" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["n"] == 3 and summary["config"]["eval"]["limit"] == 3
    assert (out_dir / "config.yaml").is_file() and len((out_dir / "records.jsonl").read_text().splitlines()) == 3


def test_eval_scores_every_split_of_eval_splits_into_its_own_folder(capsys, tmp_path, tiny_model_dir):
    out_dir = tmp_path / "r"
    code, out, err = run(capsys, "eval", "--model", str(tiny_model_dir), "--limit", "2", "--out", str(out_dir),
                         "eval.max_new_tokens=2", "eval.splits=[test_shift, test]")
    assert code == 0, err
    assert "arithmetic (test_shift) exact_match_flexible" in out and f"results: {out_dir}@test" in out
    assert json.loads((out_dir / "summary.json").read_text())["split"] == "test_shift"
    records = (tmp_path / "r@test" / "records.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in records] == ["arithmetic-test-0", "arithmetic-test-1"]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["--task", "gsm9k"], "unknown task 'gsm9k'; available: arithmetic, cosmosqa, gsm8k, hotpotqa, math"),
        (None, ["--method", "magic"], "unknown method 'magic'; available:"),
        (None, ["--model", "/no/such/model"], "could not load model '/no/such/model'"),
        (None, ["--task", "gsm8k"], "data file not found"),
        ("gsm8k/test.jsonl:{\"id\": 1, \"question\": \"q\", \"answer\": \"#### 1\"}\n{broken\n", ["--task", "gsm8k"], "test.jsonl:2: malformed JSON"),
        ("gsm8k/test.jsonl:{\"id\": 1, \"question\": \"q\"}\n", ["--task", "gsm8k"], "test.jsonl:1: row lacks field(s) answer"),
        ("gsm8k/test.jsonl:\n", ["--task", "gsm8k"], "is empty"),
        (None, ["eval.limit=0"], "eval.limit must be >= 1"),
        (None, ["eval.splits=[test, dev]"], "unknown split 'dev' of task 'arithmetic'; available: train, test, test_shift"),
    ],
)
def test_bad_input_gives_one_line_and_no_results_folder(capsys, tmp_path, tiny_model_dir, setup, args, message):
    data = tmp_path / "data"
    data.mkdir()
    if setup:
        rel, text = setup.split(":", 1)
        _write(data / rel, text)
    out_dir = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_model_dir), "--data-dir", str(data), "--out", str(out_dir), *args]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("metatuner: error: ") and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_data_that_is_not_utf8_names_the_file_and_line(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_bytes(b'{"id": "1", "question": "q", "answer": "#### 1"}\n{"question": "caf\xe9"}\n')
    code, _, err = run(capsys, "eval", "--task", "gsm8k", "--data-dir", str(tmp_path / "data"), "--model",
                       str(tiny_model_dir), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1
    assert f"{data / 'test.jsonl'}:2: not UTF-8 text" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--run", "nowhere", "--question", ""], "--question is empty"),
    (["generate", "--run", "nowhere", "--question", "q", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["export", "--run", "nowhere", "--query", "  ", "--out", "a"], "--query is empty"),
    (["eval", "--limit", "x"], "argument --limit: invalid int value: 'x' (see `metatuner eval --help`)"),
    (["bench", "--config", "cpu", "--workers", "0"], "--workers must be at least 1"),
    (["config", "eval.limit=[1"], "override 'eval.limit=[1': invalid value"),
    (["config", "eval=1", "eval.limit=2"], "conflicts with an earlier eval=..."),
])
def test_more_bad_input_gives_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("metatuner: error: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "train", "run"])
def test_out_on_an_existing_non_empty_folder_is_refused_before_any_work(capsys, tmp_path, tiny_model_dir, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run(capsys, command, "--model", str(tiny_model_dir), "--out", str(out), "eval.limit=1")
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
