"""Fuzzing of configs, data rows and command lines: every bad input ends in exactly one error line on stderr
and exit code 2, with no traceback, and nothing is written.

The bad config values are derived from the config dataclasses themselves (``metatuner/config.py``, and each
method's section in its module, found through the registry by ``config_fields``): for every option, the values
that its type, its choices or its documented range forbid (:func:`forbidden`), each checked against the command
line on its own, and not filtered by what ``load_config`` happens to reject (issue 20); hypothesis (fixed seeds)
mixes them with good overrides, writes them into config files, and fuzzes the syntax of overrides, data rows and
command lines."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.conftest import inject, record, snapshot
from metatuner.cli import main
from metatuner.config import RunConfig, config_fields, load_config
from metatuner.errors import MetatunerError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
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


def handled(code, err: str, expect: str | None, names: str | None) -> bool:
    """Exit code 2 and one error line, no traceback; the line mentions ``expect`` and names the key ``names``."""
    lines = err.splitlines()
    return (code == 2 and len(lines) == 1 and lines[0].startswith("metatuner: error: ") and "Traceback" not in err
            and (expect is None or expect in lines[0])
            and (names is None or re.search(rf"(?<![\w.]){re.escape(names)}(?![\w])", lines[0]) is not None))


def assert_handled(argv: list[str], root: Path, expect: str | None = None, names: str | None = None) -> None:
    """The command fails with one error line (mentioning ``expect``, naming the config key ``names``) and exit
    code 2, writing nothing; only then is the bad input counted as handled."""
    inject("bad input")
    before = snapshot(root)
    code, err = run_cli(argv, root)
    assert record("bad input", handled(code, err, expect, names) and snapshot(root) == before), (argv, code, err)


# ---- bad config values, derived from the config dataclasses ------------------------------------------
def options(cls: type = RunConfig, prefix: str = ""):
    """(key, type, field, section class) of every section and every option of the config, depth first."""
    for f, hint in config_fields(cls):
        yield prefix + f.name, hint, f, cls
        if dataclasses.is_dataclass(hint):
            yield from options(hint, prefix + f.name + ".")


def unwrap(hint) -> tuple[typing.Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


ZERO_HAS_A_MEANING = re.compile(r"\b0\s*[=:]|\(0\b|0-based")
MUST_BE_POSITIVE = re.compile(r"lr|lr_\w+|temperature")  # a rate or a temperature of 0 is no rate at all


def documented_range(name: str, base: type, help_: str, section: type) -> tuple[float | None, bool, float | None]:
    """(lowest allowed, whether the lowest itself is excluded, highest allowed) of a number, from its help text
    and its name: a range the help states (">= 2", "in [0, 1]", "a fraction", "numpy" seeds), else counts start
    at 1 unless the help says what 0 means, seeds are any integer, and floats (rates, weights, margins, clip norms,
    LoRA alphas, times) are >= 0, learning rates and temperatures > 0. A deprecated alias has its new name's."""
    if alias := re.search(r"old name of (\w+)", help_):
        f = next(f for f in dataclasses.fields(section) if f.name == alias.group(1))
        return documented_range(f.name, base, f.metadata["help"], section)
    if bounds := re.search(r"in \[(-?[\d.]+), (-?[\d.]+)\]", help_):
        return float(bounds.group(1)), False, float(bounds.group(2))
    if low := re.search(r">= (\d+)", help_):
        return int(low.group(1)), False, None
    if "numpy" in help_:  # numpy's seeds
        return 0, False, 2**32 - 1
    if "fraction" in help_:
        return 0.0, False, 1.0
    if "seed" in name:
        return None, False, None
    if base is int:
        return (0 if ZERO_HAS_A_MEANING.search(help_) else 1), False, None
    return 0.0, MUST_BE_POSITIVE.fullmatch(name) is not None, None


def out_of_range(name: str, base: type, help_: str, section: type) -> list[typing.Any]:
    low, excluded, high = documented_range(name, base, help_, section)
    bad = []
    if low is not None:
        bad += [low] if excluded else [low - 1 if base is int else low - 0.5]
        bad += [-1] if low - 1 > -1 else []
    if high is not None:
        bad += [high + 1 if base is int else high + 0.5]
    return [base(v) for v in bad]


WRONG_TYPE = {
    int: ["abc", 1.5, True, [1], {"a": 1}],
    float: ["abc", True, [1.0], {"a": 1}, math.nan],
    bool: ["abc", 1, [True], {"a": 1}],
    str: [True, ["a"], {"a": 1}],
}


def forbidden(key: str, hint, f: dataclasses.Field, section: type) -> list[typing.Any]:
    """The values option ``key`` must reject: of the wrong type, empty where it may not be, outside its
    choices, outside its documented range (as YAML would read them)."""
    if dataclasses.is_dataclass(hint):  # a section: a mapping, or empty
        return [0, False, [], "", "abc", [1], 1.5]
    base, optional = unwrap(hint)
    bad = [] if optional else [None]
    help_, name = f.metadata.get("help", ""), key.rsplit(".", 1)[-1]
    if typing.get_origin(base) is list:
        elem = typing.get_args(base)[0]
        bad += ["abc", {"a": 1}, [[1]], [True] if elem is str else ["abc"]]
        if elem in (int, float):
            bad += [[v] for v in out_of_range(name, elem, help_, section)]
        return bad
    bad += WRONG_TYPE[base]
    if choices := f.metadata.get("choices"):
        bad += [choices[0] + "x", "", 1] + ([choices[0].upper()] if choices[0].upper() not in choices else [])
    if base in (int, float):
        bad += out_of_range(name, base, help_, section)
    return bad


FORBIDDEN = {key: forbidden(key, hint, f, section) for key, hint, f, section in options()}
BAD_VALUES = [(key, value) for key, values in FORBIDDEN.items() for value in values]


def override(key: str, value) -> str:
    """``key=value`` with the value as YAML (flow style, one line)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


def nested(key: str, value) -> dict:
    """``{"a": {"b": value}}`` for key ``a.b``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def rejected(key: str, text: str) -> tuple[bool, str]:
    """Whether ``load_config`` rejects the override ``text`` with a config error of one line naming ``key`` (the
    command line prints it as ``metatuner: error: ...`` with exit code 2); and what it said."""
    try:
        load_config(None, [text])
    except MetatunerError as e:
        return "\n" not in str(e) and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", str(e)) is not None, str(e)
    except Exception as e:  # noqa: BLE001 - a crash is not a handled bad input
        return False, repr(e)
    return False, "accepted"


@pytest.mark.parametrize("key", sorted(FORBIDDEN))
def test_every_option_rejects_what_its_type_choices_and_documented_range_forbid(key):
    """Each value on its own, through ``load_config`` (every command reads its config there; hypothesis runs a
    sample of them through the command line below, with good overrides around them and in config files)."""
    for value in FORBIDDEN[key]:
        text = override(key, value)
        inject("bad input")
        ok, said = rejected(key, text)
        assert record("bad input", ok), (text, said)


def test_the_derived_values_cover_every_option_and_its_range():
    """Every option and section has values to reject; counts and rates have a range below them."""
    assert len(FORBIDDEN) == len(list(options())) and all(FORBIDDEN.values())
    assert FORBIDDEN["eval.limit"][-2:] == [0, -1] and -1 in FORBIDDEN["generator.share_layers"]
    assert 0 not in FORBIDDEN["generator.share_layers"] and FORBIDDEN["rlprompt.prompts_per_step"][-2:] == [1, -1]
    assert FORBIDDEN["train.lr_encoder"][-1] == 0.0 and FORBIDDEN["seed"][-2:] == [-1, 2**32]
    assert [1.5] == [v for v in FORBIDDEN["generator.share_ratio"] if v == 1.5]
    assert FORBIDDEN["bettertogether.trials"][-1] == -1 and 0 not in FORBIDDEN["bettertogether.trials"]


# ---- config overrides and config files ------------------------------------------------------------
TOP = {f.name for f, _ in config_fields(RunConfig)}
SECTIONS = sorted(k for k, hint, *_ in options() if dataclasses.is_dataclass(hint))
BAD_OVERRIDES = st.one_of(
    TEXT.filter(lambda t: "=" not in t),  # no key=value
    st.builds(lambda k, v: f"{k}={v}", TEXT.filter(lambda k: "=" not in k and k.strip().split(".")[0] not in TOP),
              TEXT),  # an unknown key
    st.sampled_from(BAD_VALUES).map(lambda kv: override(*kv)),  # a value its option forbids
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(FORBIDDEN)), st.sampled_from(YAML_JUNK)),  # not YAML
    st.builds(lambda s, v: f"{s}={v}", st.sampled_from(SECTIONS), st.integers().map(str)),  # a section that is a number
    st.sampled_from(["=1", ".=1", "eval..limit=2", "eval.limit.x=1", "eval=1", "train.steps.=3"]),
)
GOOD_OVERRIDES = st.sampled_from(["eval.limit=3", "train.steps=4", "model.dtype=bfloat16", "data.task=gsm8k"])


@FUZZ
@given(st.lists(GOOD_OVERRIDES, max_size=2), BAD_OVERRIDES, st.data())
def test_bad_config_overrides(tmp_path, good, bad, data):
    overrides = good + [bad]
    assert_handled(["eval", "--out", "out", *data.draw(st.permutations(overrides))], tmp_path)


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)


@FUZZ
@given(st.one_of(
    YAML_VALUES.filter(lambda v: v is not None and not isinstance(v, dict)).map(yaml.safe_dump),  # not a mapping
    st.dictionaries(TEXT.filter(lambda k: k not in TOP), YAML_VALUES, min_size=1, max_size=3).map(yaml.safe_dump),
    st.sampled_from(BAD_VALUES).map(lambda kv: yaml.safe_dump(nested(*kv))),  # a value its option forbids
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
                  ["--config", "cpu", "seeds=[x]"], ["--config", "cpu", "tasks=[]"], ["--config", "cpu", "bogus=1"],
                  ["--config", "cpu", "--backend", "mars"], ["--config", "cpu", "--address", "auto"],
                  ["--config", "cpu", "--backend", "ray", "--workers", "2"],
                  ["--config", "cpu", "--backend", "ray", "--cpus-per-cell", "0"],
                  ["--config", "cpu", "--backend", "ray", "--gpus-per-cell", "-1"]],
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
