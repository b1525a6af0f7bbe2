"""Property-based fuzzing (hypothesis, fixed seeds) of configs, data rows and command lines: every bad input
ends in exactly one error line on stderr and exit code 2, with no traceback, and nothing is written."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.conftest import count, snapshot
from metatuner.cli import main
from metatuner.config import RunConfig, describe

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
KEYS = {key: (default, help_) for key, default, help_ in describe()}
INT_KEYS = [k for k, (d, _) in KEYS.items() if d.lstrip("-").isdigit()]
CHOICE_KEYS = [k for k, (_, h) in KEYS.items() if "(one of:" in h]
YAML_JUNK = ["[", "{a: 1", "]", "!!python/object/apply:os.system ['true']", "&a [*a]", "*nope", "'", "a: b: c", "{{", "%TAG"]


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``metatuner argv`` in this process, run from ``cwd``: (exit code, stderr)."""
    err, old = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        os.chdir(old)
    return code, err.getvalue()


def assert_handled(argv: list[str], root: Path, expect: str | None = None) -> None:
    """The command fails with one error line (mentioning ``expect``) and exit code 2, writing nothing."""
    count("bad inputs tried")
    before = snapshot(root)
    code, err = run_cli(argv, root)
    lines = err.splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("metatuner: error: ") and "Traceback" not in err, (argv, err)
    assert expect is None or expect in lines[0], (argv, err)
    assert snapshot(root) == before, argv
    count("bad inputs handled")


# ---- config overrides and config files ------------------------------------------------------------
def _not_an_int(text: str) -> bool:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return False
    try:
        int(value)
        return not isinstance(value, str) or "." in value or "e" in value.lower() or value.strip() != value
    except (TypeError, ValueError):
        return True


BAD_OVERRIDES = st.one_of(
    TEXT.filter(lambda t: "=" not in t),  # no key=value
    st.builds(lambda k, v: f"{k}={v}", TEXT.filter(lambda k: "=" not in k and k.strip() not in KEYS), TEXT),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(INT_KEYS), TEXT.filter(_not_an_int)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(INT_KEYS), st.integers(-10**6, 0).map(str)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(CHOICE_KEYS), TEXT.filter(lambda t: t.strip() not in
                                                                                  {"", "none", "null", "None", "~"})),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(KEYS)), st.sampled_from(YAML_JUNK)),
    st.builds(lambda s, v: f"{s}={v}", st.sampled_from(["eval", "train", "model", "data"]), st.integers().map(str)),
    st.sampled_from(["=1", ".=1", "eval..limit=2", "eval.limit.x=1", "eval=1", "train.steps.=3"]),
)
GOOD_OVERRIDES = st.sampled_from(["eval.limit=3", "train.steps=4", "model.dtype=bfloat16", "data.task=gsm8k"])


def _is_valid(override: str) -> bool:
    from metatuner.config import load_config
    from metatuner.errors import MetatunerError

    try:
        load_config(None, [override])
    except MetatunerError:
        return False
    return True


@FUZZ
@given(st.lists(GOOD_OVERRIDES, max_size=2), BAD_OVERRIDES.filter(lambda o: not _is_valid(o)), st.data())
def test_bad_config_overrides(tmp_path, good, bad, data):
    overrides = good + [bad]
    assert_handled(["eval", "--out", "out", *data.draw(st.permutations(overrides))], tmp_path)


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)


@FUZZ
@given(st.one_of(
    YAML_VALUES.filter(lambda v: v is not None and not isinstance(v, dict)).map(yaml.safe_dump),  # not a mapping
    st.dictionaries(TEXT.filter(lambda k: k not in {f.name for f in dataclasses.fields(RunConfig)}),
                    YAML_VALUES, min_size=1, max_size=3).map(yaml.safe_dump),  # unknown keys
    st.fixed_dictionaries({"eval": st.dictionaries(st.sampled_from(["limit", "batch_size"]),
                                                   YAML_VALUES.filter(lambda v: not (isinstance(v, int) and v > 0)
                                                                      and v is not None), min_size=1)}).map(yaml.safe_dump),
    st.sampled_from(YAML_JUNK),  # not YAML
    st.binary(min_size=1, max_size=20).map(lambda b: b"\xff" + b),  # not UTF-8
))
def test_bad_config_files(tmp_path, text):
    config = tmp_path / "bad.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_handled(["eval", "--config", str(config), "--out", "out"], tmp_path)


# ---- JSONL data rows --------------------------------------------------------------------------------
GOOD_ROW = st.builds(lambda i, q, n: json.dumps({"id": f"r{i}", "question": q or "q", "answer": f"so\n#### {n}"}),
                     st.integers(0, 10**6), TEXT, st.integers(0, 99))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=6)
BAD_ROW = st.one_of(
    st.binary(min_size=1, max_size=16).map(lambda b: b"\x80" + b),  # not UTF-8
    st.sampled_from([b"{", b"{'id': 1}", b"[1, 2", b"nul", b'{"id": "a", }']),  # not JSON
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),  # not an object
    st.dictionaries(st.sampled_from(["id", "question"]), JSON_VALUES).map(lambda d: json.dumps(d).encode()),  # no answer
    st.builds(lambda q: json.dumps({"id": "x", "question": q, "answer": "#### 1"}).encode(),
              JSON_VALUES.filter(lambda v: not isinstance(v, str))),  # a question that is not text
    st.builds(lambda a: json.dumps({"id": "x", "question": "q", "answer": a}).encode(),
              TEXT.filter(lambda t: "####" not in t)),  # no final answer line
)


@FUZZ
@given(st.lists(GOOD_ROW.map(str.encode), max_size=3), BAD_ROW, st.lists(GOOD_ROW.map(str.encode), max_size=2))
def test_bad_data_rows_name_the_file_and_line(tmp_path, tiny_model_dir, before, bad, after):
    """Good rows around a bad one: the error names the file and the bad row's line."""
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("test", "train"):
        (data / f"{split}.jsonl").write_bytes(b"\n".join([*before, bad, *after]))
    line = len(before) + 1
    assert_handled(["eval", "--task", "gsm8k", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_model_dir),
                    "--out", "out"], tmp_path, expect=f"test.jsonl:{line}: ")


# ---- command lines ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def junk(tmp_path_factory):
    """Files and folders that look like inputs and are not: a garbage YAML, a folder with a garbage
    config.yaml / summary.json / results.json, a file that is not UTF-8."""
    root = tmp_path_factory.mktemp("junk")
    (root / "garbage.yaml").write_text("{[: not yaml")
    (root / "run").mkdir()
    (root / "run" / "config.yaml").write_text("eval: [1")
    (root / "results").mkdir()
    (root / "results" / "summary.json").write_text("{nope")
    (root / "grid").mkdir()
    (root / "grid" / "results.json").write_text('{"not": "a list"}')
    (root / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9"}\n')
    return root


def poisons(junk: Path) -> dict[str, list[list[str]]]:
    """Per command, argument lists each of which makes the command fail before it writes anything."""
    missing = str(junk / "missing")
    return {
        "eval": [["--limit", "0"], ["--limit", "-3"], ["--batch-size", "0"], ["--task", "gsm9k"],
                 ["--method", "magic"], ["--config", str(junk / "garbage.yaml")], ["--run", missing],
                 ["--run", str(junk / "run")], ["eval.limit=abc"], ["--model", missing], ["--limit", "x"]],
        "train": [["--resume", missing], ["--resume", str(junk / "run")], ["train.steps=0"], ["--bogus"],
                  ["--config", missing], ["train.schedule=sideways"]],
        "run": [["eval.limit=-1"], ["--task", ""], ["--config", str(junk / "garbage.yaml")]],
        "generate": [["--run", missing, "--question", "q"], ["--run", str(junk / "run"), "--question", ""],
                     ["--run", str(junk / "run"), "--input", str(junk / "latin1.jsonl")], ["--run", missing],
                     ["--run", str(junk), "--question", "q", "--batch-size", "0"]],
        "export": [["--run", missing, "--query", "q", "--out", "a"], ["--run", str(junk), "--query", " ", "--out", "a"],
                   ["--query", "q"]],
        "rescore": [[missing], [str(junk / "results")], [str(junk)]],
        "bench": [["--config", missing], ["--config", str(junk / "garbage.yaml")], ["--config", "cpu", "--workers", "0"],
                  ["--config", "cpu", "seeds=[x]"], ["--config", "cpu", "tasks=[]"], ["--config", "cpu", "bogus=1"]],
        "report": [[missing], [str(junk / "grid")], [str(junk)]],
        "config": [["eval.limit=[1"], ["--config", str(junk / "latin1.jsonl")], ["nokey"]],
        "tasks": [["--bogus"], ["extra"]],
        "methods": [["-x"]],
    }


FLAG = st.sampled_from(["--out", "--limit", "--task", "--model", "--batch-size", "--data-dir", "--method", "-v"])


@FUZZ
@given(st.data())
def test_bad_command_lines(tmp_path, junk, data):
    table = poisons(junk)
    command = data.draw(st.sampled_from(sorted(table)))
    poison = data.draw(st.sampled_from(table[command]))
    noise = data.draw(st.lists(st.one_of(FLAG, TEXT.filter(lambda t: not t.startswith("-"))), max_size=3))
    argv = [command, *poison, *noise] if data.draw(st.booleans()) else [command, *noise, *poison]
    assert_handled(argv, tmp_path)
