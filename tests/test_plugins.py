"""A method is one file: a toy method written into a temporary module registers itself with its config section,
and ``$METATUNER_PLUGINS`` brings it to ``metatuner config``, ``eval --method`` and a benchmark protocol (with a
task the same module registers), with no other file edited. The built-in sections keep their keys, order and
copies (``dataclasses.replace``)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import yaml

from metatuner import config as config_module
from metatuner import plugins
from metatuner.cli import main
from metatuner.config import RunConfig, load_config, register_section, to_dict
from metatuner.errors import MetatunerError
from metatuner.methods import METHODS, get_method
from metatuner.tasks import TASKS

TOY = '''
"""A toy method: zero-shot with its own suffix after the task's instruction."""
from dataclasses import dataclass

from metatuner.evaluation.predictors import LMPredictor
from metatuner.methods import METHODS, Method
from metatuner.options import _at_least, option
from metatuner.tasks import TASKS
from metatuner.tasks.arithmetic import Arithmetic


@dataclass
class ToyConfig:
    """The toy method: p~ plus a suffix."""

    suffix: str = option("", "text appended to the task's instruction")
    repeat: int = option(1, "times the suffix is appended")

    def __post_init__(self):
        _at_least("toy.repeat", self.repeat, 1)


@METHODS.register("toy")
class Toy(Method):
    """p~ with toy.suffix appended toy.repeat times."""

    config_class = ToyConfig

    def fit(self, task, train, val):
        cfg = self.method_config
        return LMPredictor(self.model, self.tokenizer, task.instruction + cfg.suffix * cfg.repeat, name="toy")


@TASKS.register("toy-arithmetic")
class ToyArithmetic(Arithmetic):
    """The arithmetic task under a name of its own."""

    name = "toy-arithmetic"
'''


@pytest.fixture()
def toy_file(tmp_path, monkeypatch):
    """The toy method's module as a file; the registries, the plugin list and sys.modules are restored after."""
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    monkeypatch.setattr(TASKS, "_items", dict(TASKS._items))
    monkeypatch.setattr(config_module, "_SECTIONS", dict(config_module._SECTIONS))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))
    monkeypatch.delenv(plugins.ENV, raising=False)
    path = tmp_path / "toy_method.py"
    path.write_text(TOY)
    yield path
    sys.modules.pop("toy_method", None)


def test_a_method_in_its_own_file_runs_through_config_and_eval(toy_file, tmp_path, tiny_model_dir, monkeypatch,
                                                               capsys):
    assert main(["config", "toy.suffix=x"]) == 2  # unknown until its module is named
    err = capsys.readouterr().err
    assert "unknown config key 'toy'" in err and "$METATUNER_PLUGINS names its module" in err
    monkeypatch.setenv(plugins.ENV, str(toy_file))
    assert main(["config"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    at = rows.index("toy.suffix")  # after the built-in methods' sections, where config.yaml writes it too
    assert rows[at - 1].startswith("bettertogether.") and rows[at + 1:at + 3] == ["toy.repeat", "serve.host"]
    assert main(["methods"]) == 0 and "toy" in capsys.readouterr().out.split()
    assert main(["config", "toy.repeat=0"]) == 2 and "toy.repeat must be >= 1" in capsys.readouterr().err

    out = tmp_path / "eval"
    code = main(["eval", "--method", "toy", "--model", str(tiny_model_dir), "--limit", "2", "--out", str(out),
                 "eval.max_new_tokens=2", "toy.suffix=' Be brief.'", "toy.repeat=2"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predictor"]["method"] == "toy" and summary["n"] == 2
    assert summary["predictor"]["instruction"].endswith(" Be brief. Be brief.")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["toy"] == {"suffix": " Be brief.", "repeat": 2}
    assert list(saved)[-5:] == ["bettertogether", "toy", "serve", "out_dir", "seed"]
    assert load_config(out / "config.yaml").toy.repeat == 2  # a run's saved config reads back


def test_a_benchmark_protocol_runs_the_plugin_method(toy_file, tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv(plugins.ENV, str(toy_file))
    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({
        "name": "toy", "tasks": ["toy-arithmetic"], "seeds": [0],
        "methods": {"toy": {"toy.suffix": " Answer now."}},
        "common": {"model": {"name": str(tiny_model_dir)}, "eval": {"limit": 2, "max_new_tokens": 2}},
    }))
    out = tmp_path / "grid"
    assert main(["bench", "--config", str(protocol), "--out", str(out), "--no-report"]) == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["method"], r["n"]) for r in rows] == [("toy-arithmetic", "toy", 2)]
    [summary] = [json.loads(p.read_text()) for p in out.rglob("summary.json")]
    assert summary["predictor"]["instruction"].endswith(" Answer now.") and summary["config"]["toy"]["repeat"] == 1


def test_plugins_by_module_name_and_the_errors_of_bad_entries(toy_file, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ENV, " toy_method , ")  # a module on sys.path; blanks and empty entries skipped
    assert get_method("toy").config_class.__name__ == "ToyConfig"
    assert load_config(None, ["toy.suffix=done"]).toy.suffix == "done"
    monkeypatch.setenv(plugins.ENV, "toy_method,no_such_module_here")
    assert main(["methods"]) == 2
    assert capsys.readouterr().err.strip().endswith("no module named 'no_such_module_here' (a module on sys.path "
                                                    "or a path to a .py file)")
    monkeypatch.setenv(plugins.ENV, str(tmp_path / "missing.py"))
    assert main(["eval", "--method", "zero-shot"]) == 2 and "plugin file" in capsys.readouterr().err
    broken = tmp_path / "broken_method.py"
    broken.write_text("raise RuntimeError('half written')\n")
    monkeypatch.setenv(plugins.ENV, str(broken))
    assert main(["methods"]) == 2
    assert "importing plugin" in (err := capsys.readouterr().err) and "RuntimeError: half written" in err
    assert "broken_method" not in sys.modules


def test_a_method_takes_its_own_config_alone_or_in_the_run_config(toy_file, tiny_model, tiny_tokenizer,
                                                                 monkeypatch):
    monkeypatch.setenv(plugins.ENV, str(toy_file))
    toy = get_method("toy")
    alone = toy(tiny_model, tiny_tokenizer, toy.config_class(suffix="!"))
    assert alone.method_config.suffix == "!" and isinstance(alone.config, RunConfig) and alone.config.seed == 0
    cfg = load_config(None, ["toy.suffix=why"])
    method = toy(tiny_model, tiny_tokenizer, cfg)
    cfg.toy = toy.config_class(repeat=3)  # read when used, as the built-in methods read theirs
    assert (method.method_config.suffix, method.method_config.repeat) == ("", 3)
    with pytest.raises(MetatunerError, match="toy must be a ToyConfig"):
        cfg.toy = {"suffix": "x"}


def test_sections_keep_their_order_and_survive_dataclasses_replace():
    cfg = load_config(None, ["dpo.steps=3", "ppo.lr=0.5"])
    assert list(to_dict(cfg))[7:15] == ["dpo", "bpo", "ppo", "grpo", "rlprompt", "opro", "bettertogether", "serve"]
    copy = dataclasses.replace(cfg, method="dpo")
    assert (copy.dpo.steps, copy.ppo.lr, copy.method) == (3, 0.5, "dpo") and copy == dataclasses.replace(copy)
    copy.dpo = dataclasses.replace(copy.dpo, steps=5)
    assert cfg.dpo.steps == 3 and copy != cfg  # the copy's sections are its own
    assert RunConfig() == load_config(None, []) and RunConfig().grpo == load_config(None, []).grpo


def test_a_section_may_not_shadow_a_core_key_or_take_another_class(monkeypatch):
    monkeypatch.setattr(config_module, "_SECTIONS", dict(config_module._SECTIONS))

    @dataclasses.dataclass
    class Other:
        x: int = 1

    with pytest.raises(ValueError, match="shadow the run config's own key 'train'"):
        register_section("train", Other)
    with pytest.raises(ValueError, match="'dpo' is registered twice"):
        register_section("dpo", Other)
    assert register_section("dpo", type(RunConfig().dpo)).config_class is type(RunConfig().dpo)  # again: no change


def test_every_module_of_the_methods_package_is_imported_with_it():
    """A new file in ``metatuner/methods/`` registers its method with no import list to edit."""
    import pkgutil

    import metatuner.methods

    names = [m.name for m in pkgutil.iter_modules(metatuner.methods.__path__)]
    assert "bettertogether_dspy" in names and all(f"metatuner.methods.{n}" in sys.modules for n in names)
