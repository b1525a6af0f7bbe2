import pytest

from metatuner.config import RunConfig, describe, load_config, parse_overrides
from metatuner.errors import MetatunerError


def test_defaults_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("eval:\n  limit: 10\n  batch_size: 4\ndata:\n  task: gsm8k\n")
    cfg = load_config(f, ["eval.limit=20", "model.dtype=bfloat16"])
    assert (cfg.eval.limit, cfg.eval.batch_size, cfg.data.task, cfg.model.dtype) == (20, 4, "gsm8k", "bfloat16")
    assert cfg.model.name == RunConfig().model.name


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.limt=3", "unknown config key 'eval.limt'; allowed: eval.limit"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("eval.limit=many", "eval.limit must be int"),
        ("eval.limit=0", "eval.limit must be >= 1"),
        ("model.dtype=int4", "model.dtype must be one of float32, bfloat16, float16"),
        ("eval.likelihood=maybe", "eval.likelihood must be bool"),
        ("eval.limit", "not of the form key=value"),
    ],
)
def test_bad_values_are_rejected_with_the_allowed_ones(override, message):
    with pytest.raises(MetatunerError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_optional_fields_accept_none():
    assert load_config(None, ["eval.limit=null"]).eval.limit is None


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(MetatunerError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval: [1, 2\n")
    with pytest.raises(MetatunerError, match="invalid YAML"):
        load_config(bad)


def test_every_field_has_help():
    rows = describe()
    assert rows and all(help_ for _, _, help_ in rows)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_numbers_in_exponent_form_are_numbers():
    cfg = load_config(None, ["train.lr_static=1e-3", "train.steps=10"])
    assert cfg.train.lr_static == 1e-3 and isinstance(cfg.train.lr_static, float)
    with pytest.raises(MetatunerError, match="train.steps must be int"):
        load_config(None, ["train.steps=1.5e1x"])
